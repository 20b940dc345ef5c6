// Placeholder until the LL handlers land: registers nothing.
#include "bindings.h"

namespace jmep {
void bind_ll(nanobind::module_& m) { (void)m; }
}  // namespace jmep

// Placeholder until the channel layer lands: registers nothing.
#include "bindings.h"

namespace jmep {
void bind_channels(nanobind::module_& m) { (void)m; }
}  // namespace jmep

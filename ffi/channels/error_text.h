// The words for a recorded device-side error, shared by the channel layer
// (Communicator::check_error) and the LL registry (Buffer.check and the FFI
// handlers), so both say the same thing about the same record.
#pragma once
#include <string>

#include "channels/error_record.h"

namespace jmep {

// "rank R timed out waiting for peer P in dispatch receive (error code 1,
// value seen V)": the record in one sentence without a prefix or full stop.
std::string describe_error(const ErrorRecord& r);

// The words for a Phase ("dispatch receive"); "?" for an unknown value.
const char* phase_name(int32_t phase);

// A consistent copy of a host-mapped record the device may still write to.
ErrorRecord snapshot_error(const ErrorRecord* rec);

}  // namespace jmep

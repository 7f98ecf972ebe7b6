// The text the explain op returns: an Explanation as JSON, parsed by mha_ext.explain.
#pragma once

#include <string>

#include "attention/backend.h"

namespace mha_ext {

// {"backend": ..., "forward": {"kernel": ..., "tiles": ..., "not_taken": {path: why}}, "backward": {...},
//  "facts": {name: value}}
std::string explanation_json(const std::string& backend, const Explanation& explanation);

}  // namespace mha_ext

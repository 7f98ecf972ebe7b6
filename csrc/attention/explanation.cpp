#include "attention/explanation.h"

namespace mha_ext {
namespace {

// A JSON string literal; the texts are plain ASCII prose, so only quotes, backslashes and control
// characters need escaping.
std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string object(const Facts& facts) {
  std::string out = "{";
  for (size_t i = 0; i < facts.size(); ++i) out += (i ? ", " : "") + quoted(facts[i].first) + ": " + quoted(facts[i].second);
  return out + "}";
}

std::string choice(const KernelChoice& c) {
  return "{\"kernel\": " + quoted(c.kernel) + ", \"tiles\": " + quoted(c.tiles) + ", \"not_taken\": " +
         object(c.not_taken) + "}";
}

}  // namespace

std::string explanation_json(const std::string& backend, const Explanation& explanation) {
  return "{\"backend\": " + quoted(backend) + ", \"forward\": " + choice(explanation.forward) +
         ", \"backward\": " + choice(explanation.backward) + ", \"facts\": " + object(explanation.facts) + "}";
}

}  // namespace mha_ext

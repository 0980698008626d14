// UTF-8 as Python's strict codec reads it and its surrogatepass handler writes it: the one check and the one
// encoder the kernels share. No Python here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mlmix::utf8 {

// True when [data, data + size) is UTF-8 that Python's strict decoder accepts (no overlong forms, no
// surrogates, nothing past U+10FFFF).
bool valid(const uint8_t* data, size_t size);

// True when every byte of [data, data + size) is ASCII (below 0x80).
inline bool is_ascii(const uint8_t* data, size_t size) {
  uint64_t any = 0;
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    uint64_t w;
    std::memcpy(&w, data + i, 8);
    any |= w;
  }
  for (; i < size; ++i) any |= data[i];
  return (any & 0x8080808080808080ULL) == 0;
}

// Appends the UTF-8 of `cp`; a lone surrogate gets its 3-byte form (Python's surrogatepass).
inline void append(std::vector<uint8_t>& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<uint8_t>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<uint8_t>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<uint8_t>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<uint8_t>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<uint8_t>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<uint8_t>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<uint8_t>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<uint8_t>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<uint8_t>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<uint8_t>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace mlmix::utf8

// Declarations of the per-operation binding functions; each lives in csrc/bind_<op>.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace mlmix::bpe {
class Encoder;
}

namespace mlmix::bind {
void bind_pack(pybind11::module_& m);
void bind_store(pybind11::module_& m);
void bind_sample(pybind11::module_& m);
void bind_dedup(pybind11::module_& m);
void bind_bpe(pybind11::module_& m);
void bind_loss(pybind11::module_& m);
void bind_records(pybind11::module_& m);
void bind_langid(pybind11::module_& m);
void bind_chat(pybind11::module_& m);
// The C++ encoder inside a mlmix._core._BpeEncoder (TypeError for anything else); lives as long as it does.
const mlmix::bpe::Encoder& bpe_encoder_of(pybind11::handle encoder);
}  // namespace mlmix::bind

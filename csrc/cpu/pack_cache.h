// Packed forms of the vector matrix V, made once and reused across calls.
//
// The CPU kernel's GEMMs read V re-laid out (transposed, widened to fp32, or in bf16 VNNI pairs). Making that
// layout costs a pass over V with a transpose on every call, which at decode sizes cost more than the products
// themselves. The patch and serving code call the op with the same V for every token, so the packed form is kept
// here and reused while V is unchanged.
//
// When a packed form may be reused. The key is (data pointer, storage, version counter, shape, row stride, dtype,
// layout kind). An entry holds a reference to V's storage, so while it exists that storage cannot be freed and
// its address cannot be handed to another tensor: a key can never alias a different tensor. Any in-place write
// through PyTorch (V.copy_, V[...] = x, any view of V) bumps the version counter shared by V and its views, so a
// modified V misses and is packed again. Writes that bypass the version counter are not seen: through `.data`,
// numpy or DLPack aliases, raw pointers, or a compiled graph that writes V and reads it in the same graph. Inference
// tensors (made under torch.inference_mode) have no version counter and are never cached. Set
// EMOKERN_PACK_CACHE=0 to turn the cache off.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace emokern {
namespace cpu {

// The layouts the kernels use; part of the key, since one V has several packed forms.
enum class PackKind : int {
  kTransposedF32 = 0,  // V^T as fp32, d x round_up(K, 16)
  kWidenedF32 = 1,     // V as fp32, K x d (16-bit V only)
  kVnniBf16 = 2,       // V^T as bf16 VNNI pairs, panels of 16 vectors (bf16 V only)
};

// A 64-byte aligned buffer of `bytes` bytes holding the packed form `kind` of V: from the cache when V is unchanged
// since it was packed, else made by fill(buffer) (which may use at::parallel_for) and cached when V can be. The
// returned tensor keeps the buffer alive for the caller even if the entry is evicted meanwhile.
at::Tensor packed_operand(const at::Tensor& V, PackKind kind, int64_t bytes, const std::function<void(void*)>& fill);

// Whether packed_operand can cache the packings of V (else it packs on every call).
bool pack_cacheable(const at::Tensor& V);

// [entries, bytes held, hits, misses, uncacheable calls] since the process started (counters) / now (sizes).
std::vector<int64_t> pack_cache_stats();

// Drops every entry (and the storage references they hold).
void clear_pack_cache();

}  // namespace cpu
}  // namespace emokern

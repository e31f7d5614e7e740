// See pack_cache.h for what is cached and when an entry may be reused.
#include "pack_cache.h"

#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>

namespace emokern {
namespace cpu {
namespace {

// Bounds: the patch holds one V per patched site plus one steering V per site (60 for 30 layers), each packed in at
// most two forms; 512 entries / 1 GiB leave room for several patches and never hold more than a model's worth.
constexpr size_t kMaxEntries = 512;
constexpr int64_t kMaxBytes = int64_t{1} << 30;

struct Key {
  const void* data;
  const c10::StorageImpl* storage;
  uint32_t version;
  int64_t rows, cols, ld;
  c10::ScalarType dtype;
  PackKind kind;

  bool operator==(const Key& o) const {
    return data == o.data && storage == o.storage && version == o.version && rows == o.rows && cols == o.cols &&
           ld == o.ld && dtype == o.dtype && kind == o.kind;
  }
};

struct Entry {
  Key key;
  c10::Storage keep;  // pins V's storage: its address cannot be reused while the entry exists
  at::Tensor packed;
};

struct Cache {
  std::mutex mu;
  std::list<Entry> entries;  // most recently used first
  int64_t bytes = 0;
  int64_t hits = 0, misses = 0, uncacheable = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: entries hold tensors, and static destruction order is unknown
  return *c;
}

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("EMOKERN_PACK_CACHE");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

at::Tensor fresh(int64_t bytes, const std::function<void(void*)>& fill) {
  at::Tensor t = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));  // CPU allocator: 64-byte aligned
  fill(t.data_ptr());
  return t;
}

}  // namespace

bool pack_cacheable(const at::Tensor& V) { return enabled() && !V.is_inference() && V.has_storage(); }

at::Tensor packed_operand(const at::Tensor& V, PackKind kind, int64_t bytes, const std::function<void(void*)>& fill) {
  Cache& c = cache();
  if (!pack_cacheable(V)) {
    {
      std::lock_guard<std::mutex> lock(c.mu);
      ++c.uncacheable;
    }
    return fresh(bytes, fill);
  }
  const Key key{V.const_data_ptr(), V.storage().unsafeGetStorageImpl(),
                V.unsafeGetTensorImpl()->version_counter().current_version(),
                V.size(0), V.size(1), V.stride(0), V.scalar_type(), kind};
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
    if (it->key == key) {
      c.entries.splice(c.entries.begin(), c.entries, it);
      ++c.hits;
      return c.entries.front().packed;
    }
  }
  ++c.misses;
  // Older packings of the same V (same storage and kind, earlier version) can never be hit again: drop them.
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    if (it->key.storage == key.storage && it->key.data == key.data && it->key.kind == key.kind) {
      c.bytes -= it->packed.nbytes();
      it = c.entries.erase(it);
    } else {
      ++it;
    }
  }
  at::Tensor packed = fresh(bytes, fill);
  c.entries.push_front(Entry{key, V.storage(), packed});
  c.bytes += bytes;
  while (c.entries.size() > kMaxEntries || (c.bytes > kMaxBytes && c.entries.size() > 1)) {
    c.bytes -= c.entries.back().packed.nbytes();
    c.entries.pop_back();
  }
  return packed;
}

std::vector<int64_t> pack_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return {static_cast<int64_t>(c.entries.size()), c.bytes, c.hits, c.misses, c.uncacheable};
}

void clear_pack_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.entries.clear();
  c.bytes = 0;
}

}  // namespace cpu
}  // namespace emokern

TORCH_LIBRARY_FRAGMENT(emokern, m) {
  // The CPU kernel's cache of packed vector matrices (csrc/cpu/pack_cache.h): [entries, bytes, hits, misses,
  // uncacheable calls], and a way to empty it.
  m.def("pack_cache_stats() -> int[]", [] { return emokern::cpu::pack_cache_stats(); });
  m.def("clear_pack_cache() -> ()", [] { emokern::cpu::clear_pack_cache(); });
}

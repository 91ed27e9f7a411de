// The CPU SIMT emulator's runtime (tests/cuda_emu, docs/ops.md): kernel launches, one fiber per CUDA
// thread, __syncthreads, warp collectives, shared memory, and the checks that make it stricter than hardware.
// Fibers switch with a few instructions of x86-64 assembly (callee-saved registers, the stack pointer, MXCSR
// and the x87 control word) rather than ucontext's swapcontext, which makes a sigprocmask system call per
// switch: one logit_kd call at B=300, K=3000, M=8 took 22 s with swapcontext and 7.5 s with this (one run
// each on the loaded 2-core test machine).
// A launch runs its blocks one after another on the calling OS thread, in forward, reverse or seeded random
// order; within a block, fibers run round-robin (in one of the same orders) until each one waits or exits.
#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda_runtime.h>

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#if !defined(__x86_64__)
#error "cuda_emu: the fiber switch is written for x86-64"
#endif

// emu_switch(&save_sp, next_sp): saves this context on its stack, stores the stack pointer, resumes next_sp.
extern "C" void emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .p2align 4
  .type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");

namespace cuda_emu {
namespace {

constexpr size_t kStack = 256 * 1024;    // per fiber; addr2line runs on it when call sites differ
constexpr size_t kSharedLimit = 48 * 1024;  // what a launch gets without opting in
constexpr int kChainDepth = 6;

struct Failure {
  std::string what;
};

struct Chain {  // return addresses from the collective's call instruction outwards (frame pointers)
  void* pc[kChainDepth];
  int n = 0;
  bool operator==(const Chain& o) const { return n == o.n && std::equal(pc, pc + n, o.pc); }
};

struct Where {
  const char* file = nullptr;
  int line = 0;
  Chain chain;
};

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while suspended
  char* stack = nullptr;
  dim3 tid;
  int linear = 0;
  bool done = false;
  const char* wait_what = nullptr;
  Where wait_where;
};

struct Collective {
  unsigned mask = 0, arrived = 0, votes = 0;
  Op op = kSyncwarp;
  Where where;
  unsigned char val[32][16];
};

struct Warp {
  Collective slot[2];  // double buffer: collective n gathers in slot n % 2 while slot (n - 1) % 2 is read
  uint64_t next = 0;   // the collective now gathering
  unsigned exited = 0, present = 0;
};

struct Block {
  std::vector<Fiber>* fibers;
  int n = 0, exited = 0;
  std::vector<Warp> warps;
  int bar_arrived = 0;
  uint64_t bar_gen = 0, events = 0;
  Where bar_where;
  bool failed = false;
  std::string error;
  unsigned char* arena = nullptr;
  size_t static_used = 0, dyn = 0;
  void* sched = nullptr;  // the scheduler's stack pointer while a fiber runs
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
};

thread_local Block* tb = nullptr;
thread_local uint64_t t_serial = 0;
std::atomic<uint64_t> g_serial{0};

struct Config {
  std::string order = "forward";  // blocks and fibers: forward | reverse | random
  uint64_t seed = 0;
  int sms = 132;  // an H100 SXM
  uint64_t launches = 0;
};
Config& config() {
  static Config c = [] {
    Config c;
    if (const char* o = std::getenv("CUDA_EMU_ORDER")) c.order = o;
    if (const char* s = std::getenv("CUDA_EMU_SEED")) c.seed = std::strtoull(s, nullptr, 10);
    if (const char* s = std::getenv("CUDA_EMU_SMS")) c.sms = std::atoi(s);
    return c;
  }();
  return c;
}

std::string fmt_dim(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// The source lines of one return address, innermost first (the inline call chain), from the debug info.
std::string resolve(void* pc) {
  static std::map<void*, std::string> cache;

  auto it = cache.find(pc);
  if (it != cache.end()) return it->second;
  std::string out;
  Dl_info info;
  if (dladdr(pc, &info) && info.dli_fname) {
    char cmd[4096];
    std::snprintf(cmd, sizeof cmd, "addr2line -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                  static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - 1 -
                                             reinterpret_cast<uintptr_t>(info.dli_fbase)));
    if (FILE* p = popen(cmd, "r")) {
      char line[1024];
      std::string all;
      while (std::fgets(line, sizeof line, p)) {
        std::string s(line);
        while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
        const auto disc = s.find(" (discriminator");
        if (disc != std::string::npos) s = s.substr(0, disc);
        all += (all.empty() ? "" : " <- ") + s;
        const auto at = s.find("csrc/");  // the kernels' own lines, not the emulator header's
        if (at != std::string::npos) out += (out.empty() ? "" : " <- ") + s.substr(at);
      }
      pclose(p);
      if (out.empty()) out = all;
    }
  }
  if (out.empty()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", pc);
    out = buf;
  }
  return cache[pc] = out;
}

// resolve(pc) as a small integer (one per distinct inline call chain), for cheap comparisons.
int source_id(void* pc) {
  static std::unordered_map<void*, int> ids;
  static std::map<std::string, int> interned;
  auto it = ids.find(pc);
  if (it != ids.end()) return it->second;
  const int id = interned.emplace(resolve(pc), static_cast<int>(interned.size())).first->second;
  return ids[pc] = id;
}

std::string describe(const Where& w) {
  std::string s = std::string(w.file) + ":" + std::to_string(w.line) + " [";
  for (int i = 0; i < w.chain.n; ++i) {
    const std::string r = resolve(w.chain.pc[i]);
    if (r.find("csrc/") == std::string::npos) break;  // past the kernel: the emulator's own frames
    s += (i ? " <- " : "") + r;
  }
  return s + "]";
}

[[noreturn]] void raise(const std::string& what) { throw Failure{what}; }

std::string who() {
  return "thread " + fmt_dim(tb->cur->tid) + " (warp " + std::to_string(tb->cur->linear / 32) + ", lane " +
         std::to_string(tb->cur->linear % 32) + ")";
}

__attribute__((noinline)) Chain capture(void** fp) {
  Chain c;
  const auto lo = reinterpret_cast<uintptr_t>(tb->cur->stack), hi = lo + kStack;
  while (c.n < kChainDepth) {
    const auto f = reinterpret_cast<uintptr_t>(fp);
    if (f < lo || f + 2 * sizeof(void*) > hi) break;
    c.pc[c.n++] = fp[1];
    void** up = static_cast<void**>(fp[0]);
    if (reinterpret_cast<uintptr_t>(up) <= f) break;
    fp = up;
  }
  return c;
}

// Two arrivals at one collective must come from one source call site: the same return addresses, or (g++
// duplicates code, e.g. a __syncthreads after an if/else) the same inline call chains in the debug info.
void check_same_site(const Where& first, const Where& mine, const char* what) {
  if (first.chain == mine.chain) return;
  if (first.file == mine.file && first.line == mine.line) {
    bool same = first.chain.n == mine.chain.n;
    for (int i = 0; same && i < first.chain.n; ++i) same = source_id(first.chain.pc[i]) == source_id(mine.chain.pc[i]);
    if (same) return;
  }
  raise(std::string(what) + ": threads meet it at different call sites: " + who() + " at " + describe(mine) +
        ", others at " + describe(first));
}

void yield() {
  Fiber* f = tb->cur;
  emu_switch(&f->sp, tb->sched);
}

void finish_fiber() {
  Block& b = *tb;
  Fiber& f = *b.cur;
  const int lane = f.linear % 32;
  Warp& w = b.warps[f.linear / 32];
  w.exited |= 1u << lane;
  const Collective& c = w.slot[w.next & 1];
  if (c.arrived != 0 && (c.mask & (1u << lane)))
    raise(who() + " exited while lanes " + hex(c.arrived) + " of mask " + hex(c.mask) + " wait for it at " +
          describe(c.where) + " (reading a lane that exited)");
  if (b.bar_arrived > 0)
    raise(who() + " exited while " + std::to_string(b.bar_arrived) + " threads wait at __syncthreads " +
          describe(b.bar_where) + " (a barrier deadlock)");
  ++b.exited;
}

void entry() {
  Block& b = *tb;
  Fiber& f = *b.cur;
  try {
    b.body(b.ctx);
    finish_fiber();
  } catch (const Failure& e) {
    if (!b.failed) b.error = e.what;
    b.failed = true;
  } catch (const std::exception& e) {
    if (!b.failed) b.error = who() + ": " + e.what();
    b.failed = true;
  }
  f.done = true;
  ++b.events;
  emu_switch(&f.sp, b.sched);  // never resumed
  __builtin_unreachable();
}

// A fresh fiber's stack as emu_switch leaves a suspended one: it "returns" into entry() with the stack
// aligned as after a call, rbp = 0 ending the frame chain, and this thread's floating-point modes.
void* fresh_stack(char* stack) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + kStack) & ~uintptr_t{15});
  uint64_t* sp = top - 9;
  uint32_t modes[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(modes[0]), "=m"(modes[1]));
  std::memcpy(sp, modes, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&entry);
  sp[8] = 0;  // entry's return address: it never returns
  return sp;
}

std::vector<int> order_of(int n, std::mt19937_64& rng) {
  std::vector<int> v(n);
  for (int i = 0; i < n; ++i) v[i] = i;
  const std::string& o = config().order;
  if (o == "reverse") std::reverse(v.begin(), v.end());
  else if (o == "random") std::shuffle(v.begin(), v.end(), rng);
  return v;
}

char* new_stack() {
  void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "cuda_emu: cannot map a fiber stack");
  return static_cast<char*>(p);
}

// Runs one block to completion (or its first failure); returns false on failure, with b.error set.
bool run_block(Block& b, const std::vector<int>& order) {
  while (true) {
    int live = 0;
    const uint64_t before = b.events;
    for (int idx : order) {
      Fiber& f = (*b.fibers)[idx];
      if (f.done) continue;
      ++live;
      b.cur = &f;
      threadIdx = f.tid;
      emu_switch(&b.sched, f.sp);
      if (b.failed) return false;
    }
    if (live == 0) return true;
    if (b.events == before) {  // nobody moved: every live thread waits for one that never comes
      std::map<std::string, int> sites;
      for (const Fiber& f : *b.fibers)
        if (!f.done) ++sites[std::string(f.wait_what) + " at " + describe(f.wait_where)];
      b.error = "deadlock:";
      for (const auto& [s, count] : sites) b.error += " " + std::to_string(count) + " threads wait in " + s + ";";
      return false;
    }
  }
}

}  // namespace

int sms() { return config().sms; }

uint64_t block_serial() { return t_serial; }

unsigned char* dynamic_smem() { return tb->arena + kSharedLimit; }

void* shared_alloc(size_t size, size_t align, uint64_t* serial) {
  Block& b = *tb;
  const size_t off = (b.static_used + align - 1) / align * align;
  if (off + size + b.dyn > kSharedLimit)
    raise("shared memory: " + std::to_string(off + size) + " static + " + std::to_string(b.dyn) +
          " dynamic bytes exceed the " + std::to_string(kSharedLimit) + " a launch gets without opting in");
  b.static_used = off + size;
  *serial = t_serial;
  return b.arena + off;
}

[[noreturn]] void fail(const char* file, int line, const char* what) {
  raise(who() + ": " + what + " at " + file + ":" + std::to_string(line));
}

void syncthreads(const char* file, int line) {
  Block& b = *tb;
  Fiber& f = *b.cur;
  if (b.exited > 0)
    raise(who() + " reaches __syncthreads at " + file + ":" + std::to_string(line) + " after " +
          std::to_string(b.exited) + " threads of the block exited (a barrier deadlock)");
  const Where w{file, line, capture(static_cast<void**>(__builtin_frame_address(0)))};
  if (b.bar_arrived == 0) b.bar_where = w;
  else check_same_site(b.bar_where, w, "__syncthreads");
  ++b.events;
  if (++b.bar_arrived == b.n) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    return;
  }
  const uint64_t gen = b.bar_gen;
  f.wait_what = "__syncthreads";
  f.wait_where = w;
  while (b.bar_gen == gen) yield();
}

unsigned warp_collective(Op op, unsigned mask, const void* in, void* out, size_t size, int arg, int width,
                         const char* file, int line) {
  static const char* const names[] = {"__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync", "__shfl_sync",
                                      "__ballot_sync",  "__any_sync",       "__all_sync",     "__syncwarp"};
  Block& b = *tb;
  Fiber& f = *b.cur;
  const int lane = f.linear % 32;
  const unsigned bit = 1u << lane;
  Warp& w = b.warps[f.linear / 32];
  const auto at = [&] { return std::string(names[op]) + " at " + file + ":" + std::to_string(line); };
  if (!(mask & bit)) raise(who() + ": " + at() + " with mask " + hex(mask) + " that leaves out the calling lane");
  if (mask & ~w.present) raise(who() + ": " + at() + " with mask " + hex(mask) + " naming lanes past the block's end");
  if (mask & w.exited)
    raise(who() + ": " + at() + " with mask " + hex(mask) + " naming lanes that exited (" + hex(mask & w.exited) + ")");
  if (width <= 0 || width > 32 || (width & (width - 1))) raise(who() + ": " + at() + ": width must be a power of 2 <= 32");
  const Where wh{file, line, capture(static_cast<void**>(__builtin_frame_address(0)))};
  const uint64_t n = w.next;
  Collective& c = w.slot[n & 1];
  if (c.arrived == 0) {
    c.mask = mask;
    c.op = op;
    c.where = wh;
    c.votes = 0;
  } else {
    if (c.op != op || c.mask != mask)
      raise("warp collective mismatch: " + who() + " calls " + at() + " with mask " + hex(mask) + " while lanes " +
            hex(c.arrived) + " wait in " + names[c.op] + " with mask " + hex(c.mask) + " at " + describe(c.where));
    check_same_site(c.where, wh, names[op]);
  }
  if (size) std::memcpy(c.val[lane], in, size);
  if (arg && (op == kBallot || op == kAny || op == kAll)) c.votes |= bit;
  c.arrived |= bit;
  ++b.events;
  if (c.arrived == c.mask) {
    w.next = n + 1;
    w.slot[(n + 1) & 1].arrived = 0;
  } else {
    f.wait_what = names[op];
    f.wait_where = wh;
    while (w.next == n) yield();
  }
  switch (op) {
    case kBallot: return c.votes;
    case kAny: return c.votes != 0;
    case kAll: return c.votes == c.mask;
    case kSyncwarp: return 0;
    default: break;
  }
  const int base = lane & ~(width - 1), sub = lane & (width - 1);
  int src = lane;
  if (op == kShflXor) src = (sub ^ arg) < width ? base + (sub ^ arg) : lane;
  else if (op == kShflDown) src = sub + arg < width ? lane + arg : lane;
  else if (op == kShflUp) src = sub - arg >= 0 ? lane - arg : lane;
  else src = base + (arg & (width - 1));
  if (!(c.mask & (1u << src)))
    raise(who() + ": " + at() + " reads lane " + std::to_string(src) + " outside the mask " + hex(c.mask));
  std::memcpy(out, c.val[src], size);
  return 0;
}

void launch(const char* file, int line, const char* kernel, dim3 grid, dim3 block, size_t smem, void*,
            void (*body)(void*), void* ctx) {
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const std::string where = std::string("cuda_emu: ") + kernel + " launched at " + file + ":" + std::to_string(line);
  TORCH_CHECK(blocks > 0 && threads > 0 && threads <= 1024 && grid.y < 65536 && grid.z < 65536 && block.z <= 64,
              where, " with grid ", fmt_dim(grid), " and block ", fmt_dim(block), ": invalid configuration argument");
  TORCH_CHECK(smem <= kSharedLimit, where, ": ", smem, " bytes of dynamic shared memory exceed ", kSharedLimit);
  TORCH_CHECK(tb == nullptr, where, ": a launch from inside a kernel");
  Config& cfg = config();
  std::mt19937_64 rng(cfg.seed * 0x9E3779B97F4A7C15ull + ++cfg.launches);
  static thread_local std::vector<Fiber> pool;
  static thread_local std::vector<unsigned char> arena;
  const int n = static_cast<int>(threads);
  if (pool.size() < threads) pool.resize(threads);
  for (int t = 0; t < n; ++t) {
    if (!pool[t].stack) pool[t].stack = new_stack();
    pool[t].linear = t;
    pool[t].tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
  }
  arena.resize(kSharedLimit + smem + 64);
  gridDim = grid;
  blockDim = block;
  const std::vector<int> block_order = order_of(static_cast<int>(blocks), rng);
  for (const int bi : block_order) {
    Block b;
    b.fibers = &pool;
    b.n = n;
    b.dyn = smem;
    b.body = body;
    b.ctx = ctx;
    b.arena = arena.data();
    std::memset(b.arena, 0xff, kSharedLimit + smem);  // NaN in every floating type until written
    b.warps.resize((n + 31) / 32);
    for (int wi = 0; wi < static_cast<int>(b.warps.size()); ++wi) {
      const int lanes = std::min(32, n - 32 * wi);
      b.warps[wi].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    }
    for (int t = 0; t < n; ++t) {
      Fiber& f = pool[t];
      f.done = false;
      f.wait_what = "?";
      f.sp = fresh_stack(f.stack);
    }
    blockIdx = dim3(bi % grid.x, (bi / grid.x) % grid.y, bi / (uint64_t{grid.x} * grid.y));
    t_serial = ++g_serial;
    tb = &b;
    const bool ok = run_block(b, order_of(n, rng));
    tb = nullptr;
    TORCH_CHECK(ok, where, ", block ", fmt_dim(blockIdx), ": ", b.error);
  }
}

}  // namespace cuda_emu

namespace {
void configure(std::string order, int64_t seed, int64_t sms) {
  TORCH_CHECK(order == "forward" || order == "reverse" || order == "random",
              "order: expected forward, reverse or random, got ", order);
  TORCH_CHECK(sms >= 1, "sms: expected at least 1, got ", sms);
  auto& c = cuda_emu::config();
  c.order = order;
  c.seed = static_cast<uint64_t>(seed);
  c.sms = static_cast<int>(sms);
  c.launches = 0;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(mtkd_fast_cudaemu, m) {
  m.def("emu_configure(str order, int seed, int sms) -> ()", &configure);
}

// Concurrency stress test of the mask classes: many threads call
// forward on one object, in inference mode, no-grad mode and grad mode (with
// backward), while another thread updates the mask thousands of times.
//
// The contract (classes/fake_sparsity_class.h): a forward concurrent with
// update_mask computes with the old mask or the new one, whole; once the
// updates are done the next forward gives the last mask's result, never a
// stale kept one. In-place edits of the tensor mask() returns are not
// synchronized, and a forward racing with one may read a mix, element by
// element, of the masks written. A backward runs outside the object: when an
// update lands between a training forward and its backward, autograd refuses
// the backward (the saved mask was modified in place) or, if the update
// lands while the backward reads the mask, the gradient may mix the two, as
// for any tensor written while autograd reads it; so the gradient is checked
// exactly when no update overlapped the step.
//
// Sizes come from the environment so that the sanitizer script can run it
// longer: SPARSITY_STRESS_THREADS (forward threads, default 8) and
// SPARSITY_STRESS_UPDATES (default 2000).

#include "classes/fake_sparsity_class.h"
#include "test_helpers.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/autograd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value == nullptr ? fallback : std::atoi(value);
}

enum class Mode { kInference, kNoGrad, kGrad };

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kInference:
      return "inference";
    case Mode::kNoGrad:
      return "no-grad";
    default:
      return "grad";
  }
}

// Two threads of each mode per four: half inference (a C++ server), a
// quarter no-grad, a quarter training.
Mode mode_of_thread(int t) {
  switch (t % 4) {
    case 0:
    case 1:
      return Mode::kInference;
    case 2:
      return Mode::kNoGrad;
    default:
      return Mode::kGrad;
  }
}

// One object of either class and the masks it cycles through.
struct Subject {
  c10::intrusive_ptr<sparsity::MaskHolder> holder;
  std::vector<at::Tensor> masks;
  // mask_k applied to the weight, as the class's operator defines it.
  std::vector<at::Tensor> allowed;
  // The mask as multiplied (rows broadcast), to check gradients.
  std::vector<at::Tensor> full_masks;
};

Subject make_subject(bool row_mask, const at::Tensor& weight, int mask_count) {
  Subject s;
  for (int k = 0; k < mask_count; ++k) {
    at::Tensor mask = row_mask ? at::rand({weight.size(0)}) > 0.5 : at::rand(weight.sizes()) > 0.5;
    at::Tensor full = row_mask ? mask.reshape({-1, 1}).expand(weight.sizes()) : mask;
    s.allowed.push_back(full * weight.detach());
    s.full_masks.push_back(full.to(weight.scalar_type()).contiguous());
    s.masks.push_back(std::move(mask));
  }
  if (row_mask) {
    s.holder = c10::make_intrusive<sparsity::FakeStructuredSparsity>(s.masks[0].clone());
  } else {
    s.holder = c10::make_intrusive<sparsity::FakeSparsity>(s.masks[0].clone());
  }
  return s;
}

// Index of the allowed result out equals bit for bit, or -1.
int which_mask(const Subject& s, const at::Tensor& out) {
  for (size_t k = 0; k < s.allowed.size(); ++k) {
    if (at::equal(out, s.allowed[k])) {
      return static_cast<int>(k);
    }
  }
  return -1;
}

// Odd while an update is in progress; read before a training forward and
// after its backward, it tells whether an update overlapped the step.
std::atomic<int64_t> update_epoch{0};

struct Tally {
  std::atomic<int64_t> forwards{0};
  std::atomic<int64_t> backwards{0};
  // Backward refused because update_mask wrote the saved mask after the
  // forward: autograd's own "modified by an inplace operation" error.
  std::atomic<int64_t> backwards_refused{0};
  std::atomic<int64_t> backwards_overlapped{0};
  std::atomic<int64_t> bad{0};
  std::mutex first_error_mutex;
  std::string first_error;

  void fail(const std::string& what) {
    ++bad;
    std::lock_guard<std::mutex> lock(first_error_mutex);
    if (first_error.empty()) {
      first_error = what;
    }
  }
};

void forward_until_done(
    const Subject& s,
    const at::Tensor& weight,
    Mode mode,
    std::atomic<int>& started,
    const std::atomic<bool>& done,
    Tally& tally) {
  ++started;
  // Runs at least a few forwards after the updates are over as well.
  int after_done = 0;
  while (after_done < 3) {
    if (done) {
      ++after_done;
    }
    try {
      if (mode == Mode::kGrad) {
        c10::AutoGradMode grad(true);
        const int64_t epoch_before = update_epoch.load();
        const at::Tensor out = s.holder->forward(weight);
        const int k = which_mask(s, out.detach());
        if (k < 0 || !out.requires_grad()) {
          tally.fail(std::string("grad-mode forward: ") + (k < 0 ? "a mix of masks" : "no graph"));
        }
        ++tally.forwards;
        try {
          const auto grads = torch::autograd::grad({out.sum()}, {weight});
          const bool overlapped = epoch_before % 2 == 1 || update_epoch.load() != epoch_before;
          if (overlapped) {
            ++tally.backwards_overlapped;
          } else if (k >= 0 && !at::equal(grads[0], s.full_masks[k])) {
            tally.fail("the gradient is not the forward's mask (no update overlapped)");
          }
          ++tally.backwards;
        } catch (const c10::Error& e) {
          if (std::string(e.what()).find("modified by an inplace operation") == std::string::npos) {
            throw;
          }
          ++tally.backwards_refused;
        }
        continue;
      }
      std::optional<c10::InferenceMode> inference;
      std::optional<c10::AutoGradMode> no_grad;
      if (mode == Mode::kInference) {
        inference.emplace();
      } else {
        no_grad.emplace(false);
      }
      const at::Tensor out = s.holder->forward(weight);
      if (which_mask(s, out) < 0) {
        tally.fail(std::string(mode_name(mode)) + " forward: not one mask's result (a mix, or stale)");
      }
      ++tally.forwards;
    } catch (const std::exception& e) {
      tally.fail(std::string(mode_name(mode)) + " forward threw: " + e.what());
    }
  }
}

void wait_until_all_started(const std::atomic<int>& started, int threads) {
  while (started.load() < threads) {
    std::this_thread::yield();
  }
}

int64_t inference_forward_then_hits(const Subject& s, const at::Tensor& weight, const at::Tensor& expected) {
  c10::InferenceMode inference;
  EXPECT_TRUE(sparsity_test::same_bits(s.holder->forward(weight), expected));
  const int64_t hits = s.holder->cache_hits();
  EXPECT_TRUE(sparsity_test::same_bits(s.holder->forward(weight), expected));
  return s.holder->cache_hits() - hits;
}

class ConcurrencyStress : public ::testing::TestWithParam<bool> {};

TEST_P(ConcurrencyStress, ForwardsSeeTheOldOrTheNewMaskWhole) {
  const bool row_mask = GetParam();
  const int threads = env_int("SPARSITY_STRESS_THREADS", 8);
  const int updates = env_int("SPARSITY_STRESS_UPDATES", 2000);
  at::manual_seed(0);
  const at::Tensor weight = at::randn({48, 40}).set_requires_grad(true);
  const Subject s = make_subject(row_mask, weight, 4);

  std::atomic<int> started{0};
  std::atomic<bool> done{false};
  Tally tally;
  std::vector<std::thread> forwarders;
  for (int t = 0; t < threads; ++t) {
    // Training threads each have a leaf of their own (same values): threads
    // sharing one leaf share its gradient accumulator, whose reference
    // counts live in libtorch, where ThreadSanitizer cannot see them.
    const Mode mode = mode_of_thread(t);
    const at::Tensor x = mode == Mode::kGrad ? weight.detach().clone().set_requires_grad(true) : weight;
    forwarders.emplace_back([&, mode, x] { forward_until_done(s, x, mode, started, done, tally); });
  }
  wait_until_all_started(started, threads);
  int64_t updates_done = 0;
  for (int i = 1; i <= updates; ++i) {
    // Lets forwards run between updates, not only around the whole loop.
    std::this_thread::yield();
    ++update_epoch;
    s.holder->update_mask(s.masks[i % s.masks.size()]);
    ++update_epoch;
    ++updates_done;
  }
  done = true;
  for (auto& t : forwarders) {
    t.join();
  }
  EXPECT_EQ(tally.bad.load(), 0) << tally.first_error;
  EXPECT_EQ(updates_done, updates);
  EXPECT_GT(tally.forwards.load(), threads);
  // The last update is seen, from the cache too: never a stale kept result.
  const at::Tensor& last = s.allowed[updates % s.masks.size()];
  EXPECT_EQ(inference_forward_then_hits(s, weight, last), 1);
  std::printf(
      "[ stress ] %s: %d threads, %lld updates, %lld forwards, %lld backwards checked (%lld overlapped an "
      "update), %lld backwards refused (mask updated after the forward), %lld cache hits\n",
      row_mask ? "FakeStructuredSparsity" : "FakeSparsity",
      threads,
      static_cast<long long>(updates_done),
      static_cast<long long>(tally.forwards.load()),
      static_cast<long long>(tally.backwards.load()),
      static_cast<long long>(tally.backwards_overlapped.load()),
      static_cast<long long>(tally.backwards_refused.load()),
      static_cast<long long>(s.holder->cache_hits()));
}

// In-place writes to mask() are the caller's race: each element a forward
// returns comes from one of the masks written, and once the writes are done
// (and seen: the writer's thread is joined) the next forward is the last
// mask's.
TEST_P(ConcurrencyStress, InPlaceMaskEditsMayMixButNeverGoStale) {
  const bool row_mask = GetParam();
  const int threads = env_int("SPARSITY_STRESS_THREADS", 8);
  // Fewer: each forward here checks its result element by element.
  const int updates = env_int("SPARSITY_STRESS_UPDATES", 2000) / 4;
  at::manual_seed(1);
  const at::Tensor weight = at::randn({48, 40});
  const Subject s = make_subject(row_mask, weight, 4);
  const at::Tensor stacked = at::stack(s.allowed);

  std::atomic<int> started{0};
  std::atomic<bool> done{false};
  std::atomic<int64_t> bad{0}, forwards{0};
  std::vector<std::thread> forwarders;
  for (int t = 0; t < threads; ++t) {
    forwarders.emplace_back([&] {
      ++started;
      c10::InferenceMode inference;
      int after_done = 0;
      while (after_done < 3) {
        if (done) {
          ++after_done;
        }
        const at::Tensor out = s.holder->forward(weight);
        if (!(out.unsqueeze(0) == stacked).any(0).all().item<bool>()) {
          ++bad;
        }
        ++forwards;
      }
    });
  }
  wait_until_all_started(started, threads);
  std::thread writer([&] {
    const at::Tensor held = s.holder->mask();
    for (int i = 1; i <= updates; ++i) {
      std::this_thread::yield();
      held.copy_(s.masks[i % s.masks.size()]);
    }
  });
  writer.join();
  done = true;
  for (auto& t : forwarders) {
    t.join();
  }
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(forwards.load(), threads);
  std::printf(
      "[ stress ] %s: %d threads, %d in-place writes of mask(), %lld forwards\n",
      row_mask ? "FakeStructuredSparsity" : "FakeSparsity",
      threads,
      updates,
      static_cast<long long>(forwards.load()));
  EXPECT_EQ(inference_forward_then_hits(s, weight, s.allowed[updates % s.masks.size()]), 1);
}

INSTANTIATE_TEST_SUITE_P(
    MaskClasses,
    ConcurrencyStress,
    ::testing::Values(false, true),
    [](const ::testing::TestParamInfo<bool>& info) {
      return info.param ? std::string("FakeStructuredSparsity") : std::string("FakeSparsity");
    });

} // namespace

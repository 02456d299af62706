#include "patch_stream.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>

namespace proalign {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The part of a tile (origin tx, ty at the level; tw x th of it exists) that lands in one patch
// (origin ox, oy, side r), cropped to the image (w x h).
struct Visible {
  int64_t x0, x1, y0, y1;  // level pixels, half-open
  bool empty() const { return x1 <= x0 || y1 <= y0; }
};

Visible visible(int64_t tx, int64_t ty, int64_t tw, int64_t th, int64_t ox, int64_t oy, int64_t r, int64_t w,
                int64_t h) {
  return Visible{std::max({tx, ox, int64_t{0}}), std::min({tx + tw, ox + r, w}), std::max({ty, oy, int64_t{0}}),
                 std::min({ty + th, oy + r, h})};
}

// Where the stored tile should have covered the patch but the decoded frame did not (a short last
// strip, truncated LZW data): `fill`, as the Python path leaves its prefilled canvas there.
void fill_gap(uint8_t* patch, int64_t ox, int64_t oy, int64_t r, const Visible& full, const Visible& got,
              uint8_t fill) {
  for (int64_t y = full.y0; y < full.y1; ++y) {
    int64_t x0 = full.x0;
    if (!got.empty() && y >= got.y0 && y < got.y1) x0 = std::max(x0, got.x1);
    if (x0 < full.x1) std::memset(patch + ((y - oy) * r + (x0 - ox)) * 3, fill, static_cast<size_t>(full.x1 - x0) * 3);
  }
}

// Decoding straight into a patch: rows inside the patch point at it when the whole decoded row is
// wanted, else at scratch rows copied afterwards; rows outside it share one junk row.
struct DirectTarget {
  uint8_t* patch;
  int64_t r, ox, oy, tx, ty, tw, th, w, h;
  std::vector<uint8_t>* scratch;
  std::vector<uint8_t*>* rows;
  Visible vis{0, 0, 0, 0};
  int64_t fw = 0, fh = 0;
  bool cropped = false;
};

uint8_t** direct_layout(void* ctx, unsigned out_w, unsigned out_h, std::string* error) {
  auto* t = static_cast<DirectTarget*>(ctx);
  t->fw = out_w;
  t->fh = out_h;
  t->vis = visible(t->tx, t->ty, std::min<int64_t>(t->tw, out_w), std::min<int64_t>(t->th, out_h), t->ox, t->oy,
                   t->r, t->w, t->h);
  const size_t stride = static_cast<size_t>(out_w) * 3;
  t->cropped = !t->vis.empty() && !(t->vis.x0 == t->tx && t->vis.x1 == t->tx + out_w);
  try {
    // one junk row, plus a whole scratch frame when visible rows must be cropped
    t->scratch->resize(stride * ((t->cropped ? out_h : 0) + 1));
    t->rows->resize(out_h);
  } catch (const std::bad_alloc&) {
    *error = "out of memory for a " + std::to_string(stride * out_h) + "-byte tile";
    return nullptr;
  }
  uint8_t* junk = t->scratch->data() + (t->cropped ? stride * out_h : 0);
  for (unsigned y = 0; y < out_h; ++y) {
    const int64_t gy = t->ty + y;
    uint8_t* row = junk;
    if (!t->vis.empty() && gy >= t->vis.y0 && gy < t->vis.y1) {
      row = t->cropped ? t->scratch->data() + stride * y : t->patch + ((gy - t->oy) * t->r + (t->tx - t->ox)) * 3;
    }
    (*t->rows)[y] = row;
  }
  return t->rows->data();
}

struct CacheTarget {
  uint8_t* pixels = nullptr;  // allocated by the layout
  int64_t fw = 0, fh = 0;
  std::vector<uint8_t*>* rows;
};

uint8_t** cache_layout(void* ctx, unsigned out_w, unsigned out_h, std::string* error) {
  auto* t = static_cast<CacheTarget*>(ctx);
  const size_t stride = static_cast<size_t>(out_w) * 3;
  t->pixels = static_cast<uint8_t*>(std::malloc(stride * out_h ? stride * out_h : 1));
  if (t->pixels == nullptr) {
    *error = "out of memory for a " + std::to_string(stride * out_h) + "-byte tile";
    return nullptr;
  }
  try {
    t->rows->resize(out_h);
  } catch (const std::bad_alloc&) {
    *error = "out of memory for a tile's rows";
    return nullptr;
  }
  for (unsigned y = 0; y < out_h; ++y) (*t->rows)[y] = t->pixels + stride * y;
  t->fw = out_w;
  t->fh = out_h;
  return t->rows->data();
}

}  // namespace

// One tile's pixels into the rows `target` lays out, whatever its codec.
std::string decode_tile_rows(const PatchGeometry& g_, TileWorkspace* w, const JpegRowTarget& target) {
  const auto* data = reinterpret_cast<const uint8_t*>(w->bytes.data());
  const size_t n = w->bytes.size();
  std::string err;
  switch (g_.codec) {
    case TileCodec::kJpeg:
      return decode_jpeg_rows(JpegInput{data, n}, g_.expect, g_.scale, target);
    case TileCodec::kJpeg2000: {
      err = decode_j2k(data, n, g_.expect.width, g_.expect.height, g_.expect.shorter_ok, &w->j2k);
      if (!err.empty()) return err;
      uint8_t** rows = target.layout(target.ctx, static_cast<unsigned>(w->j2k.width()),
                                     static_cast<unsigned>(w->j2k.height()), &err);
      if (rows == nullptr) {
        w->j2k.reset();
        return err;
      }
      for (int y = 0; y < w->j2k.height(); ++y) w->j2k.row(y, rows[y], g_.ycbcr);
      w->j2k.reset();
      return std::string();
    }
    default: {
      const size_t spp = static_cast<size_t>(g_.samples), tw = g_.expect.width;
      const size_t limit = tw * g_.expect.height * spp;
      w->raw.resize(limit + 32);  // LZW copies 16 bytes at a time
      size_t got = 0;
      if (g_.codec == TileCodec::kLzw) {
        err = lzw_decode(data, n, w->raw.data(), limit, &got);
      } else if (g_.codec == TileCodec::kDeflate) {
        err = inflate_tile(data, n, w->raw.data(), limit, &got);
      } else {
        got = std::min(n, limit);
        std::memcpy(w->raw.data(), data, got);
      }
      if (!err.empty()) return err;
      const size_t rows_n = got / (tw * spp);  // a short tile gives its whole rows, as decode_tile does
      if (g_.predictor) undo_horizontal_predictor(w->raw.data(), rows_n, tw, spp);
      uint8_t** rows = target.layout(target.ctx, static_cast<unsigned>(tw), static_cast<unsigned>(rows_n), &err);
      if (rows == nullptr) return err;
      for (size_t y = 0; y < rows_n; ++y) {
        const uint8_t* src = w->raw.data() + y * tw * spp;
        if (spp == 3) {
          std::memcpy(rows[y], src, tw * 3);
        } else {
          for (size_t x = 0; x < tw; ++x) std::memcpy(rows[y] + 3 * x, src + spp * x, 3);
        }
      }
      return std::string();
    }
  }
}

namespace {

struct WholeTile {
  DecodedTile* out;
  std::vector<uint8_t*> rows;
};

uint8_t** whole_layout(void* ctx, unsigned w, unsigned h, std::string* error) {
  auto* t = static_cast<WholeTile*>(ctx);
  try {
    t->out->pixels.assign(static_cast<size_t>(w) * h * 3, 0);
    t->rows.resize(h);
  } catch (const std::bad_alloc&) {
    *error = "out of memory";
    return nullptr;
  }
  for (unsigned y = 0; y < h; ++y) t->rows[y] = t->out->pixels.data() + static_cast<size_t>(w) * 3 * y;
  t->out->width = static_cast<int>(w);
  t->out->height = static_cast<int>(h);
  return t->rows.data();
}

}  // namespace

DecodedTile decode_tile_for_test(const std::string& data, const std::string& codec, unsigned width, unsigned height,
                                 int samples, bool predictor, bool ycbcr, bool shorter_ok) {
  PatchGeometry g;
  g.expect = JpegExpect{width, height, shorter_ok};
  g.samples = samples;
  g.predictor = predictor;
  g.ycbcr = ycbcr;
  g.codec = codec == "jpeg" ? TileCodec::kJpeg : codec == "jpeg2000" ? TileCodec::kJpeg2000
          : codec == "lzw" ? TileCodec::kLzw : codec == "deflate" ? TileCodec::kDeflate : TileCodec::kNone;
  TileWorkspace w;
  w.bytes = data;
  DecodedTile out;
  WholeTile t{&out, {}};
  out.error = decode_tile_rows(g, &w, JpegRowTarget{whole_layout, &t});
  if (!out.error.empty()) out.pixels.clear();
  return out;
}

BufferPool::~BufferPool() {
  for (auto* p : free_) std::free(p);
}

uint8_t* BufferPool::take() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      uint8_t* p = free_.back();
      free_.pop_back();
      return p;
    }
  }
  void* p = std::malloc(bytes_ ? bytes_ : 1);
  if (p == nullptr) throw std::bad_alloc();
  return static_cast<uint8_t*>(p);
}

void BufferPool::give(uint8_t* p) {
  if (p == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < keep_) {
      free_.push_back(p);
      return;
    }
  }
  std::free(p);
}

PatchStream::PatchStream(const TileReader& reader, PatchGeometry geometry, std::vector<TileRef> level_tiles,
                         std::vector<int64_t> origins, int batch_size, int threads, int max_ahead)
    : reader_(reader), g_(geometry), level_tiles_(std::move(level_tiles)), origins_(std::move(origins)) {
  if (g_.width <= 0 || g_.height <= 0 || g_.tile_w <= 0 || g_.tile_h <= 0 || g_.tiles_across <= 0 ||
      g_.read_size <= 0 || g_.read_size > (int64_t{1} << 16))
    throw std::invalid_argument("patch stream: bad level geometry or patch size");
  if (g_.tiles_across * g_.tile_w < g_.width) throw std::invalid_argument("patch stream: too few tiles across");
  if (g_.codec != TileCodec::kJpeg && g_.scale != 1)
    throw std::invalid_argument("patch stream: only JPEG tiles decode at a reduced scale");
  if (g_.codec != TileCodec::kJpeg && (g_.expect.width != static_cast<unsigned>(g_.tile_w) ||
                                       g_.expect.height != static_cast<unsigned>(g_.tile_h)))
    throw std::invalid_argument("patch stream: the stored tile size must be the decoded one");
  if (g_.samples != 3 && g_.samples != 4) throw std::invalid_argument("patch stream: 3 or 4 samples per pixel");
  if (g_.codec == TileCodec::kJpeg2000 && !openjpeg_loaded())
    throw std::invalid_argument("patch stream: no OpenJPEG library loaded for JPEG 2000 tiles");
  if (origins_.size() % 2) throw std::invalid_argument("patch stream: origins must be (x, y) pairs");
  n_ = origins_.size() / 2;
  batch_size_ = static_cast<size_t>(std::max(1, batch_size));
  max_ahead_ = static_cast<size_t>(std::max(1, max_ahead));
  n_batches_ = (n_ + batch_size_ - 1) / batch_size_;
  patch_bytes_ = static_cast<size_t>(g_.read_size) * g_.read_size * 3;
  if (patch_bytes_ * batch_size_ > (size_t{1} << 36)) throw std::invalid_argument("patch stream: batches too large");
  pool_ = std::make_shared<BufferPool>(patch_bytes_ * std::min(batch_size_, std::max<size_t>(n_, 1)),
                                       max_ahead_ + 2);

  // Rank tiles by first use; note each one's first and last patch.
  const int64_t tiles_down = (g_.height + g_.tile_h - 1) / g_.tile_h;
  const size_t level_count = static_cast<size_t>(g_.tiles_across * tiles_down);
  if (level_tiles_.size() < level_count)
    throw std::invalid_argument("patch stream: the tile table is smaller than the level's tile grid");
  rank_of_.assign(level_count, -1);
  prefill_.assign(n_, 0);
  hi_.assign(n_batches_, 0);
  size_t hi = 0;
  for (size_t p = 0; p < n_; ++p) {
    const int64_t ox = origins_[2 * p], oy = origins_[2 * p + 1], r = g_.read_size;
    prefill_[p] = ox < 0 || oy < 0 || ox + r > g_.width || oy + r > g_.height;
    const Rect t = tiles_of(p);
    for (int64_t row = t.r0; row <= t.r1; ++row) {
      for (int64_t col = t.c0; col <= t.c1; ++col) {
        int64_t& k = rank_of_[static_cast<size_t>(row * g_.tiles_across + col)];
        if (k < 0) {
          k = static_cast<int64_t>(tile_lin_.size());
          tile_lin_.push_back(row * g_.tiles_across + col);
          first_.push_back(static_cast<int64_t>(p));
          last_.push_back(static_cast<int64_t>(p));
        }
        last_[static_cast<size_t>(k)] = static_cast<int64_t>(p);
        hi = std::max(hi, static_cast<size_t>(k) + 1);
      }
    }
    hi_[p / batch_size_] = hi;  // cumulative: the last patch of the batch sets it
  }
  const size_t T = tile_lin_.size();
  direct_.assign(T, 0);
  for (size_t k = 0; k < T; ++k) {
    direct_[k] = first_[k] == last_[k];
    direct_count_ += direct_[k];
  }
  cache_.assign(T, Cached{});
  done_.assign(T, 0);
  batches_.assign(n_batches_, nullptr);
  const int want = std::max(1, threads);
  try {
    for (int i = 0; i < want; ++i) workers_.emplace_back([this] { work(); });
  } catch (const std::exception&) {
    // fewer threads than asked (resource limits): next() decodes itself when none started
  }
}

PatchStream::~PatchStream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
  for (auto* b : batches_) pool_->give(b);
  for (auto& c : cache_) std::free(c.pixels);
}

PatchStream::Rect PatchStream::tiles_of(size_t p) const {
  const int64_t ox = origins_[2 * p], oy = origins_[2 * p + 1], r = g_.read_size;
  const int64_t x0 = std::max<int64_t>(ox, 0), y0 = std::max<int64_t>(oy, 0);
  const int64_t x1 = std::min(ox + r, g_.width), y1 = std::min(oy + r, g_.height);
  if (x1 <= x0 || y1 <= y0) return Rect{0, 0, -1, -1};
  return Rect{x0 / g_.tile_w, y0 / g_.tile_h, (x1 - 1) / g_.tile_w, (y1 - 1) / g_.tile_h};
}

void PatchStream::ensure_batch(size_t b) {
  if (batches_[b] != nullptr) return;
  const size_t start = b * batch_size_, count = std::min(batch_size_, n_ - start);
  uint8_t* buf = pool_->take();
  for (size_t i = 0; i < count; ++i)
    if (prefill_[start + i]) std::memset(buf + i * patch_bytes_, g_.fill, patch_bytes_);
  batches_[b] = buf;
  ++in_flight_;
  max_in_flight_ = std::max(max_in_flight_, in_flight_);
}

void PatchStream::take_tile(size_t k) {
  if (direct_[k]) ensure_batch(static_cast<size_t>(first_[k]) / batch_size_);
}

std::string PatchStream::process(size_t k, Worker* w, bool* decode) {
  *decode = false;
  const int64_t lin = tile_lin_[k];
  if (static_cast<size_t>(lin) >= level_tiles_.size()) return "the level's tile table has no such tile";
  std::string err = reader_.read_into(level_tiles_[static_cast<size_t>(lin)], &w->bytes);
  if (!err.empty()) return err;
  const int64_t tx = (lin % g_.tiles_across) * g_.tile_w, ty = (lin / g_.tiles_across) * g_.tile_h;
  *decode = true;
  if (direct_[k]) {
    const size_t p = static_cast<size_t>(first_[k]);
    uint8_t* batch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch = batches_[p / batch_size_];  // allocated before the tile was handed out
    }
    DirectTarget t{batch + (p % batch_size_) * patch_bytes_, g_.read_size, origins_[2 * p], origins_[2 * p + 1],
                   tx, ty, g_.tile_w, g_.tile_h, g_.width, g_.height, &w->scratch, &w->rows};
    const Visible full = visible(tx, ty, g_.tile_w, g_.tile_h, t.ox, t.oy, t.r, g_.width, g_.height);
    if (w->bytes.empty()) {  // a tile the writer left out: white, whatever `fill` is
      fill_gap(t.patch, t.ox, t.oy, t.r, full, Visible{0, 0, 0, 0}, 255);
      return std::string();
    }
    err = decode_tile_rows(g_, w, JpegRowTarget{direct_layout, &t});
    if (!err.empty()) return err;
    if (t.cropped) {
      const size_t stride = static_cast<size_t>(t.fw) * 3, n = static_cast<size_t>(t.vis.x1 - t.vis.x0) * 3;
      for (int64_t y = t.vis.y0; y < t.vis.y1; ++y)
        std::memcpy(t.patch + ((y - t.oy) * t.r + (t.vis.x0 - t.ox)) * 3,
                    w->scratch.data() + stride * static_cast<size_t>(y - ty) + static_cast<size_t>(t.vis.x0 - tx) * 3,
                    n);
    }
    if (t.vis.x0 != full.x0 || t.vis.x1 != full.x1 || t.vis.y0 != full.y0 || t.vis.y1 != full.y1)
      fill_gap(t.patch, t.ox, t.oy, t.r, full, t.vis, g_.fill);
    return std::string();
  }
  Cached c;
  if (w->bytes.empty()) {
    c.w = g_.tile_w;
    c.h = g_.tile_h;
    c.pixels = static_cast<uint8_t*>(std::malloc(static_cast<size_t>(c.w * c.h * 3)));
    if (c.pixels == nullptr) throw std::bad_alloc();
    std::memset(c.pixels, 255, static_cast<size_t>(c.w * c.h * 3));
  } else {
    CacheTarget t{nullptr, 0, 0, &w->rows};
    err = decode_tile_rows(g_, w, JpegRowTarget{cache_layout, &t});
    if (!err.empty()) {
      std::free(t.pixels);
      return err;
    }
    c = Cached{t.pixels, t.fw, t.fh};
  }
  cache_[k] = c;  // published to the consumer by done_ under mu_
  const int64_t now = cached_.fetch_add(1) + 1;
  int64_t peak = peak_cached_.load();
  while (now > peak && !peak_cached_.compare_exchange_weak(peak, now)) {
  }
  return std::string();
}

void PatchStream::work() {
  Worker w;
  for (;;) {
    size_t k;
    std::string err;
    bool decode = false, wake = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto ready = [&] {
        return stop_ || next_tile_ == tile_lin_.size() || error_rank_ != SIZE_MAX ||
               static_cast<size_t>(first_[next_tile_]) / batch_size_ < consumer_batch_ + max_ahead_;
      };
      if (!ready()) {
        const int64_t t0 = now_ns();
        work_cv_.wait(lock, ready);
        worker_wait_ns_.fetch_add(now_ns() - t0);
      }
      if (stop_ || next_tile_ == tile_lin_.size() || error_rank_ != SIZE_MAX) return;
      k = next_tile_++;
      try {
        take_tile(k);
      } catch (const std::exception&) {
        err = "the patch engine failed: out of memory for a batch";
      }
    }
    if (err.empty()) {
      try {
        err = process(k, &w, &decode);
      } catch (const std::bad_alloc&) {
        err = "the patch engine failed: out of memory";
      } catch (const std::exception& e) {
        err = std::string("the patch engine failed: ") + e.what();
      } catch (...) {
        err = "the patch engine failed";
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      mark_done(k, decode, err);
      // wake the consumer only when what it waits for is there (not once per tile)
      wake = waiting_ && (done_prefix_ >= waiting_for_ || error_rank_ != SIZE_MAX);
    }
    if (wake) done_cv_.notify_all();
  }
}

void PatchStream::mark_done(size_t k, bool decode, const std::string& err) {
  done_[k] = 1;
  tiles_done_.fetch_add(1);
  if (!err.empty() && k < error_rank_) {  // the first failing tile in plan order is the one reported
    error_rank_ = k;
    error_ = PatchBatch{nullptr, 0, true, tile_lin_[k], decode, err};
  }
  while (done_prefix_ < done_.size() && done_[done_prefix_]) ++done_prefix_;
}

void PatchStream::paste(uint8_t* patch, size_t p, size_t k) const {
  const Cached& c = cache_[k];
  const int64_t lin = tile_lin_[k];
  const int64_t tx = (lin % g_.tiles_across) * g_.tile_w, ty = (lin / g_.tiles_across) * g_.tile_h;
  const int64_t ox = origins_[2 * p], oy = origins_[2 * p + 1], r = g_.read_size;
  const Visible full = visible(tx, ty, g_.tile_w, g_.tile_h, ox, oy, r, g_.width, g_.height);
  const Visible v = visible(tx, ty, std::min(g_.tile_w, c.w), std::min(g_.tile_h, c.h), ox, oy, r, g_.width,
                            g_.height);
  if (!v.empty()) {
    const size_t n = static_cast<size_t>(v.x1 - v.x0) * 3;
    for (int64_t y = v.y0; y < v.y1; ++y)
      std::memcpy(patch + ((y - oy) * r + (v.x0 - ox)) * 3, c.pixels + ((y - ty) * c.w + (v.x0 - tx)) * 3, n);
  }
  if (v.x0 != full.x0 || v.x1 != full.x1 || v.y0 != full.y0 || v.y1 != full.y1)
    fill_gap(patch, ox, oy, r, full, v, g_.fill);
}

bool PatchStream::next(PatchBatch* out) {
  *out = PatchBatch{};
  size_t b, start, count;
  uint8_t* buf;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (consumer_batch_ >= n_batches_) return false;
    b = consumer_batch_;
    const size_t need = hi_[b];
    if (workers_.empty()) {  // no thread could be started: decode here, in order
      lock.unlock();
      Worker w;
      for (;;) {
        size_t k;
        {
          std::lock_guard<std::mutex> l(mu_);
          if (next_tile_ >= need || error_rank_ != SIZE_MAX) break;
          k = next_tile_++;
          take_tile(k);
        }
        bool decode = false;
        std::string err = process(k, &w, &decode);
        std::lock_guard<std::mutex> l(mu_);
        mark_done(k, decode, err);
      }
      lock.lock();
    }
    waiting_ = true;
    waiting_for_ = need;
    const int64_t t0 = now_ns();
    done_cv_.wait(lock, [&] { return done_prefix_ >= std::min(need, error_rank_); });
    consumer_wait_ns_.fetch_add(now_ns() - t0);
    waiting_ = false;
    if (error_rank_ < need) {
      *out = error_;
      consumer_batch_ = n_batches_;  // the stream is over
      stop_ = true;
      lock.unlock();
      work_cv_.notify_all();
      return true;
    }
    ensure_batch(b);
    start = b * batch_size_;
    count = std::min(batch_size_, n_ - start);
    buf = batches_[b];  // no worker touches this batch any more: all its tiles are done
  }
  const int64_t t_assemble = now_ns();
  for (size_t i = 0; i < count; ++i) {
    const size_t p = start + i;
    const Rect t = tiles_of(p);
    for (int64_t row = t.r0; row <= t.r1; ++row) {
      for (int64_t col = t.c0; col <= t.c1; ++col) {
        const size_t k = static_cast<size_t>(rank_of_[static_cast<size_t>(row * g_.tiles_across + col)]);
        if (direct_[k]) continue;
        paste(buf + i * patch_bytes_, p, k);
        if (static_cast<size_t>(last_[k]) == p) {  // its last patch: the shared tile is no longer needed
          std::free(cache_[k].pixels);
          cache_[k] = Cached{};
          cached_.fetch_sub(1);
        }
      }
    }
  }
  assemble_ns_.fetch_add(now_ns() - t_assemble);
  {
    std::lock_guard<std::mutex> lock(mu_);
    batches_[b] = nullptr;
    --in_flight_;
    ++consumer_batch_;
  }
  work_cv_.notify_all();
  out->pixels = buf;
  out->count = count;
  return true;
}

}  // namespace proalign

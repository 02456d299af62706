// Patches straight from stored tiles, all in C++: a persistent pool of worker threads reads each
// stored tile (pread, tables spliced), decodes it with libjpeg(-turbo) and writes its pixels where
// the patches want them, so the caller gets finished (count, r, r, 3) batches and does no per-tile
// or per-patch work. Built only with libjpeg (PROALIGN_WITH_LIBJPEG).
//
// The plan is the one slides/patches.py makes: patches in visiting order (raster order of their
// level origins), tiles numbered ("ranked") in order of first use. Each tile is read and decoded
// once. A tile that only one patch covers (every tile of an aligned grid) is decoded straight into
// that patch's place in its batch: no tile buffer, no copy. A tile several patches share is decoded
// into a cache buffer, pasted into each of them when their batch is assembled and freed after its
// last patch, so memory holds about one band of shared tiles plus the batches in flight. Workers
// run at most `max_ahead` batches ahead of the consumer.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "codecs.hpp"
#include "jpeg_decoder.hpp"
#include "tile_reader.hpp"

namespace proalign {

enum class TileCodec { kJpeg, kJpeg2000, kLzw, kDeflate, kNone };

// The level as decoded (after 1/scale DCT scaling) and the patches' side at that level.
struct PatchGeometry {
  int64_t width = 0, height = 0;   // level size
  int64_t tile_w = 0, tile_h = 0;  // one tile as decoded
  int64_t tiles_across = 0;
  int64_t read_size = 0;  // patch side, level pixels
  int scale = 1;          // libjpeg scale_denom (1, 2, 4, 8)
  JpegExpect expect;      // the stored tile size (before scaling); shorter_ok: strips
  uint8_t fill = 255;     // pixels outside the image; tiles the writer left out are white
  TileCodec codec = TileCodec::kJpeg;
  int samples = 3;        // samples per pixel of LZW / Deflate / raw tiles (3 or 4: alpha dropped)
  bool predictor = false; // TIFF predictor 2 (LZW / Deflate / raw)
  bool ycbcr = false;     // Aperio 33003 JPEG 2000: YCbCr -> RGB after decoding
};

// One thread's reusable buffers for reading and decoding tiles.
struct TileWorkspace {
  std::string bytes;  // the tile as stored (JPEG tables spliced in)
  std::vector<uint8_t> scratch, raw;
  std::vector<uint8_t*> rows;
  J2kDecoded j2k;
};

// w->bytes decoded with g's codec into the rows `target` lays out (the frame's size decides them).
std::string decode_tile_rows(const PatchGeometry& g, TileWorkspace* w, const JpegRowTarget& target);

// One tile, whole, through decode_tile_rows (tests compare it with decode/cpu.py's decode_tile).
DecodedTile decode_tile_for_test(const std::string& data, const std::string& codec, unsigned width, unsigned height,
                                 int samples, bool predictor, bool ycbcr, bool shorter_ok);

// Batch buffers come back here when the caller frees them (a few are kept), so steady-state batches
// reuse memory that is already mapped instead of faulting in fresh pages every time.
class BufferPool {
 public:
  BufferPool(size_t bytes, size_t keep) : bytes_(bytes), keep_(keep) {}
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;
  uint8_t* take();         // a buffer of bytes(); throws std::bad_alloc
  void give(uint8_t* p);   // back to the pool, or freed when it holds enough
  size_t bytes() const { return bytes_; }

 private:
  std::mutex mu_;
  std::vector<uint8_t*> free_;
  size_t bytes_, keep_;
};

// One finished batch, or the error that stopped the stream.
struct PatchBatch {
  uint8_t* pixels = nullptr;  // (count, r, r, 3) uint8 from pool(); the caller gives it back there
  size_t count = 0;
  bool failed = false;
  int64_t tile = -1;          // linear index of the tile that failed
  bool decode_error = false;  // false: it could not be read
  std::string error;
};

class PatchStream {
 public:
  // origins: 2 * n level-pixel (x, y) patch origins in visiting order. level_tiles: every stored
  // tile of the level by linear index (row * tiles_across + col).
  PatchStream(const TileReader& reader, PatchGeometry geometry, std::vector<TileRef> level_tiles,
              std::vector<int64_t> origins, int batch_size, int threads, int max_ahead);
  ~PatchStream();
  PatchStream(const PatchStream&) = delete;
  PatchStream& operator=(const PatchStream&) = delete;

  // The next batch in order (false when all were handed out). Blocks until its tiles are decoded.
  bool next(PatchBatch* out);

  size_t patches() const { return n_; }
  size_t tiles_needed() const { return tile_lin_.size(); }
  size_t tiles_decoded() const { return tiles_done_.load(); }
  size_t direct_tiles() const { return direct_count_; }
  int64_t peak_cached_tiles() const { return peak_cached_.load(); }
  size_t max_batches_ahead() const { return max_in_flight_; }
  int threads() const { return static_cast<int>(workers_.size()); }
  const std::shared_ptr<BufferPool>& pool() const { return pool_; }
  // seconds the workers spent waiting for the consumer (the window was full), all workers together,
  // and the consumer spent waiting for tiles: where a stream loses time, for profiling
  double worker_wait_s() const { return worker_wait_ns_.load() * 1e-9; }
  double consumer_wait_s() const { return consumer_wait_ns_.load() * 1e-9; }
  double assemble_s() const { return assemble_ns_.load() * 1e-9; }

 private:
  struct Cached {
    uint8_t* pixels = nullptr;
    int64_t w = 0, h = 0;
  };
  struct Rect {  // a patch's covered tiles, inclusive; empty when c1 < c0
    int64_t c0, r0, c1, r1;
  };
  Rect tiles_of(size_t p) const;
  void ensure_batch(size_t b);  // under mu_
  void work();
  // Read and decode tile rank k; returns the error ("" when fine), *decode tells which stage.
  using Worker = TileWorkspace;
  std::string process(size_t k, Worker* w, bool* decode);
  void take_tile(size_t k);  // under mu_
  void mark_done(size_t k, bool decode, const std::string& err);  // under mu_: tile k finished
  void paste(uint8_t* patch, size_t p, size_t k) const;

  const TileReader& reader_;
  PatchGeometry g_;
  std::vector<TileRef> level_tiles_;
  std::vector<int64_t> origins_;
  size_t n_ = 0, batch_size_ = 1, n_batches_ = 0, max_ahead_ = 2;
  size_t patch_bytes_ = 0;

  std::vector<int64_t> rank_of_;        // linear tile index -> rank (-1: no patch covers it)
  std::vector<int64_t> tile_lin_;       // rank -> linear tile index
  std::vector<int64_t> first_, last_;   // rank -> first / last patch position using it
  std::vector<size_t> hi_;              // batch -> tiles (ranks) that must be done before it
  std::vector<uint8_t> direct_;         // rank -> decoded straight into its one patch
  std::vector<uint8_t> prefill_;        // patch -> needs `fill` first (part of it lies outside)
  size_t direct_count_ = 0;
  std::vector<Cached> cache_;           // rank -> shared tile's pixels while patches still need it
  std::shared_ptr<BufferPool> pool_;
  std::vector<uint8_t*> batches_;       // batch -> buffer until handed out
  std::vector<uint8_t> done_;

  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  size_t next_tile_ = 0, done_prefix_ = 0, consumer_batch_ = 0;
  size_t error_rank_ = SIZE_MAX;
  bool waiting_ = false;    // the consumer sleeps until done_prefix_ >= waiting_for_ (or an error)
  size_t waiting_for_ = 0;
  PatchBatch error_;
  size_t in_flight_ = 0, max_in_flight_ = 0;
  bool stop_ = false;
  std::atomic<size_t> tiles_done_{0};
  std::atomic<int64_t> cached_{0}, peak_cached_{0};
  std::atomic<int64_t> worker_wait_ns_{0}, consumer_wait_ns_{0}, assemble_ns_{0};
  std::vector<std::thread> workers_;
};

}  // namespace proalign

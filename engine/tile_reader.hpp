// The host tile engine: parallel positional reads of compressed tiles from one slide file, with the
// JPEG tables spliced into each tile's bytes, streamed in batches through a bounded queue.
// Plain C++17 + POSIX; no Python here (bindings/engine_bindings.cpp wraps it).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace proalign {

// One tile to read: where it lies in the file.
struct TileRef {
  uint64_t offset;
  uint64_t size;
};

// A tile's bytes, or the reason it could not be read (then `error` is non-empty).
struct TileBytes {
  std::string data;
  std::string error;
};

// Reads tiles of one file with `threads` worker threads. `prefix` is prepended to every non-empty
// tile after dropping the tile's own SOI marker (0xFFD8) when `splice_jpeg` is set: the caller
// passes JPEGTables minus its EOI (plus any extra marker segment), so each output is a complete
// JPEG stream. Thread-safe: read() may be called from several threads.
class TileReader {
 public:
  TileReader(const std::string& path, std::string prefix, bool splice_jpeg, int threads);
  ~TileReader();
  TileReader(const TileReader&) = delete;
  TileReader& operator=(const TileReader&) = delete;

  std::vector<TileBytes> read(const std::vector<TileRef>& tiles) const;
  // One tile into `data` (its capacity is reused: no allocation per tile once it is large enough);
  // returns the error, empty on success (a tile of size 0 gives empty data and no error).
  std::string read_into(const TileRef& t, std::string* data) const;
  uint64_t file_size() const { return file_size_; }
  int threads() const { return threads_; }

 private:
  TileBytes read_one(const TileRef& t) const;
  std::string path_;
  std::string prefix_;
  bool splice_jpeg_;
  int threads_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
};

// Streams batches of tiles read by a TileReader on a background thread, at most `max_ahead`
// batches in memory: the reader runs ahead of the decoder, never unboundedly.
class TileStream {
 public:
  TileStream(const TileReader& reader, std::vector<std::vector<TileRef>> batches, int max_ahead);
  ~TileStream();
  TileStream(const TileStream&) = delete;
  TileStream& operator=(const TileStream&) = delete;

  // Next batch in order; false when all batches were handed out.
  bool next(std::vector<TileBytes>* out);
  size_t max_queued() const { return max_queued_; }

 private:
  void run();
  const TileReader& reader_;
  std::vector<std::vector<TileRef>> batches_;
  size_t max_ahead_;
  std::deque<std::vector<TileBytes>> queue_;
  size_t handed_out_ = 0;
  size_t max_queued_ = 0;
  bool stop_ = false;
  std::string broken_;  // why the reading thread stopped early, empty while it is fine
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread worker_;
};

}  // namespace proalign

#include "tile_reader.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>

namespace proalign {
namespace {

// An exception must never leave a worker thread (std::terminate would abort the process): each one
// becomes the tile's error message, which Python raises as a SlideError naming the file and tile.
TileBytes failed_tile(const std::string& what) {
  TileBytes out;
  out.error = "the tile reader failed: " + what;
  return out;
}

}  // namespace

TileReader::TileReader(const std::string& path, std::string prefix, bool splice_jpeg, int threads)
    : path_(path), prefix_(std::move(prefix)), splice_jpeg_(splice_jpeg), threads_(std::max(1, threads)) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    int e = errno;
    ::close(fd_);
    throw std::runtime_error(path + ": cannot stat: " + std::strerror(e));
  }
  file_size_ = static_cast<uint64_t>(st.st_size);
#ifdef POSIX_FADV_RANDOM
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);  // tiles are read out of file order; no read-ahead waste
#endif
}

TileReader::~TileReader() {
  if (fd_ >= 0) ::close(fd_);
}

TileBytes TileReader::read_one(const TileRef& t) const {
  TileBytes out;
  out.error = read_into(t, &out.data);
  if (!out.error.empty()) out.data.clear();
  return out;
}

std::string TileReader::read_into(const TileRef& t, std::string* data) const {
  data->clear();
  if (t.size == 0) return std::string();  // a tile the writer left empty: the decoder paints background
  if (t.offset > file_size_ || t.size > file_size_ - t.offset) {
    return "tile bytes " + std::to_string(t.offset) + "+" + std::to_string(t.size) + " lie past the end of the " +
           std::to_string(file_size_) + "-byte file (truncated slide?)";
  }
  uint64_t offset = t.offset, size = t.size;
  size_t head = 0;
  if (splice_jpeg_) {
    // Tables first, then the tile without its own SOI: read the 2 SOI bytes into the prefix's tail.
    head = prefix_.size() >= 2 ? prefix_.size() - 2 : 0;
  }
  data->resize(head + size);
  if (head) std::memcpy(&(*data)[0], prefix_.data(), head);
  char* dst = &(*data)[head];
  uint64_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd_, dst + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      data->clear();
      return std::string("read failed at byte ") + std::to_string(offset + done) + ": " +
             (n < 0 ? std::strerror(errno) : "unexpected end of file");
    }
    done += static_cast<uint64_t>(n);
  }
  if (head) {
    if (size < 2 || static_cast<unsigned char>(dst[0]) != 0xFF || static_cast<unsigned char>(dst[1]) != 0xD8) {
      data->clear();
      return "tile does not start with a JPEG SOI marker (corrupt tile or wrong offset)";
    }
    // The tile's SOI sits where the prefix's last two bytes belong: put them back.
    std::memcpy(dst, prefix_.data() + head, 2);
  }
  return std::string();
}

std::vector<TileBytes> TileReader::read(const std::vector<TileRef>& tiles) const {
  std::vector<TileBytes> out(tiles.size());
  const int workers = static_cast<int>(std::min<size_t>(threads_, tiles.size()));
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tiles.size();) {
      try {
        out[i] = read_one(tiles[i]);
      } catch (const std::bad_alloc&) {
        out[i] = failed_tile("out of memory for " + std::to_string(tiles[i].size) + " bytes");
      } catch (const std::exception& e) {
        out[i] = failed_tile(e.what());
      } catch (...) {
        out[i] = failed_tile("unknown error");
      }
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(workers > 1 ? workers - 1 : 0);
    for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  } catch (const std::exception&) {
    // no more threads (resource limits): the threads started and this one share the work
  }
  work();
  for (auto& th : pool) th.join();
  return out;
}

TileStream::TileStream(const TileReader& reader, std::vector<std::vector<TileRef>> batches, int max_ahead)
    : reader_(reader), batches_(std::move(batches)), max_ahead_(static_cast<size_t>(std::max(1, max_ahead))) {
  worker_ = std::thread([this] {
    try {
      run();
    } catch (const std::exception& e) {  // never let it escape the thread; next() reports it per tile
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = e.what();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = "unknown error";
    }
    cv_.notify_all();
  });
}

TileStream::~TileStream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void TileStream::run() {
  for (const auto& batch : batches_) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || queue_.size() < max_ahead_; });
      if (stop_) return;
    }
    std::vector<TileBytes> tiles;
    try {
      tiles = reader_.read(batch);
    } catch (const std::exception& e) {  // e.g. no memory for the batch itself: an error on every tile
      tiles.assign(batch.size(), failed_tile(e.what()));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(tiles));
      max_queued_ = std::max(max_queued_, queue_.size());
    }
    cv_.notify_all();
  }
}

bool TileStream::next(std::vector<TileBytes>* out) {
  std::unique_lock<std::mutex> lock(mu_);
  if (handed_out_ == batches_.size()) return false;
  cv_.wait(lock, [&] { return !queue_.empty() || !broken_.empty(); });
  if (queue_.empty()) {  // the reading thread died: this batch and the rest fail, nothing hangs
    out->assign(batches_[handed_out_].size(), failed_tile(broken_));
  } else {
    *out = std::move(queue_.front());
    queue_.pop_front();
  }
  ++handed_out_;
  lock.unlock();
  cv_.notify_all();
  return true;
}

}  // namespace proalign

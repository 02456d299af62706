#include "jpeg_decoder.hpp"

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <thread>

#include <jpeglib.h>

namespace proalign {
namespace {

struct ErrorManager {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void on_error(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<ErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

void on_warning(j_common_ptr, int) {}  // corrupt-data warnings would print to stderr per tile

constexpr size_t kMaxTileBytes = size_t{1} << 28;  // MAX_TILE_RAW_BYTES of slides/slide.py

// decode_one's target: the tile's own pixel vector, sized once the frame is known.
struct VectorTarget {
  DecodedTile* out;
  std::vector<uint8_t*> rows;
};

uint8_t** vector_layout(void* ctx, unsigned w, unsigned h, std::string* error) {
  auto* t = static_cast<VectorTarget*>(ctx);
  const size_t stride = static_cast<size_t>(w) * 3;
  try {
    t->out->pixels.resize(stride * h);
    t->rows.resize(h);
  } catch (const std::bad_alloc&) {
    *error = "out of memory for a " + std::to_string(stride * h) + "-byte tile";
    return nullptr;
  }
  for (unsigned y = 0; y < h; ++y) t->rows[y] = t->out->pixels.data() + stride * y;
  t->out->width = static_cast<int>(w);
  t->out->height = static_cast<int>(h);
  return t->rows.data();
}

void decode_one(const JpegInput& in, const JpegExpect& expect, int scale_denom, DecodedTile* out) {
  VectorTarget target{out, {}};
  out->error = decode_jpeg_rows(in, expect, scale_denom, JpegRowTarget{vector_layout, &target});
  if (!out->error.empty()) {
    out->pixels.clear();
    out->width = out->height = 0;
  }
}

}  // namespace

// No C++ objects with destructors live between setjmp and longjmp here: only the C structs; the
// target's memory belongs to the caller and is sized by `layout` once the frame header has been
// checked against the expected tile size, so a hostile header allocates nothing.
std::string decode_jpeg_rows(const JpegInput& in, const JpegExpect& expect, int scale_denom,
                             const JpegRowTarget& target) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  err.message[0] = '\0';
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.emit_message = on_warning;
  std::string problem;  // declared before setjmp: nothing with a destructor starts after it
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return err.message[0] ? std::string(err.message) : std::string("JPEG decoding failed");
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, in.data, static_cast<unsigned long>(in.size));
  jpeg_read_header(&cinfo, TRUE);
  const unsigned w = cinfo.image_width, h = cinfo.image_height;
  const bool size_ok = expect.width == 0 ||
                       (w == expect.width && (h == expect.height || (expect.shorter_ok && h >= 1 && h < expect.height)));
  if (!size_ok) {
    std::snprintf(err.message, sizeof(err.message), "JPEG frame is %ux%u px but the %s is %ux%u px (corrupt tile)", w, h,
                  expect.shorter_ok ? "strip" : "tile", expect.width, expect.height);
    jpeg_destroy_decompress(&cinfo);
    return err.message;
  }
  cinfo.out_color_space = JCS_RGB;  // the engine marks RGB tiles (Adobe marker); YCbCr converts
  cinfo.scale_num = 1;
  cinfo.scale_denom = static_cast<unsigned int>(scale_denom);
  cinfo.dct_method = JDCT_ISLOW;  // libjpeg-turbo's default, as imagecodecs and OpenSlide use
  jpeg_calc_output_dimensions(&cinfo);
  const size_t bytes = static_cast<size_t>(cinfo.output_width) * 3 * cinfo.output_height;
  if (bytes > kMaxTileBytes) {  // even unchecked, no tile may claim more than the readers ever allow
    std::snprintf(err.message, sizeof(err.message), "JPEG frame of %ux%u px is too large for a tile", w, h);
    jpeg_destroy_decompress(&cinfo);
    return err.message;
  }
  uint8_t** rows = target.layout(target.ctx, cinfo.output_width, cinfo.output_height, &problem);
  if (rows == nullptr) {
    jpeg_destroy_decompress(&cinfo);
    return problem.empty() ? std::string("no memory for the decoded tile") : problem;
  }
  jpeg_start_decompress(&cinfo);
  while (cinfo.output_scanline < cinfo.output_height) {
    // as many rows as libjpeg will take: whole iMCU rows go straight into the target
    jpeg_read_scanlines(&cinfo, rows + cinfo.output_scanline, cinfo.output_height - cinfo.output_scanline);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return std::string();
}

std::vector<DecodedTile> decode_jpeg_batch(const std::vector<JpegInput>& tiles, const JpegExpect& expect,
                                           int scale_denom, int threads) {
  std::vector<DecodedTile> out(tiles.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tiles.size();) {
      if (tiles[i].size == 0) {
        out[i].error = "empty tile";
        continue;
      }
      try {  // an exception must never leave a worker thread: std::terminate would abort the process
        decode_one(tiles[i], expect, scale_denom, &out[i]);
      } catch (const std::exception& e) {
        out[i].pixels.clear();
        out[i].error = std::string("the JPEG decoder failed: ") + e.what();
      } catch (...) {
        out[i].pixels.clear();
        out[i].error = "the JPEG decoder failed";
      }
    }
  };
  const int workers = static_cast<int>(std::min<size_t>(std::max(1, threads), tiles.size()));
  std::vector<std::thread> pool;
  try {
    for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  } catch (const std::exception&) {
    // no more threads (resource limits): the threads started and this one share the work
  }
  work();
  for (auto& t : pool) t.join();
  return out;
}

}  // namespace proalign

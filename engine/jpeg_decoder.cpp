#include "jpeg_decoder.hpp"

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cstdio>
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

// No C++ objects with destructors live between setjmp and longjmp here: only the C structs and the
// output vector, which is sized before decoding starts.
void decode_one(const JpegInput& in, int scale_denom, DecodedTile* out) {
  jpeg_decompress_struct cinfo;
  ErrorManager err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = on_error;
  err.pub.emit_message = on_warning;
  if (setjmp(err.jump)) {
    out->error = err.message;
    out->pixels.clear();
    jpeg_destroy_decompress(&cinfo);
    return;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, in.data, static_cast<unsigned long>(in.size));
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;  // the engine marks RGB tiles (Adobe marker); YCbCr converts
  cinfo.scale_num = 1;
  cinfo.scale_denom = static_cast<unsigned int>(scale_denom);
  cinfo.dct_method = JDCT_ISLOW;  // libjpeg-turbo's default, as imagecodecs and OpenSlide use
  jpeg_start_decompress(&cinfo);
  out->width = static_cast<int>(cinfo.output_width);
  out->height = static_cast<int>(cinfo.output_height);
  const size_t stride = static_cast<size_t>(out->width) * 3;
  out->pixels.resize(stride * out->height);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = out->pixels.data() + stride * cinfo.output_scanline;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
}

}  // namespace

std::vector<DecodedTile> decode_jpeg_batch(const std::vector<JpegInput>& tiles, int scale_denom, int threads) {
  std::vector<DecodedTile> out(tiles.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < tiles.size();) {
      if (tiles[i].size == 0) {
        out[i].error = "empty tile";
        continue;
      }
      decode_one(tiles[i], scale_denom, &out[i]);
    }
  };
  const int workers = static_cast<int>(std::min<size_t>(std::max(1, threads), tiles.size()));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  return out;
}

}  // namespace proalign

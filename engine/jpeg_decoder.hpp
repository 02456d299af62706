// JPEG tile decoding with libjpeg(-turbo) on the engine's own threads, optionally scaled in the DCT
// domain (1/2, 1/4, 1/8: "shrink on load", far fewer IDCT pixels when patches are downsampled).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace proalign {

struct DecodedTile {
  std::vector<uint8_t> pixels;  // RGB, row-major, height x width x 3
  int width = 0;
  int height = 0;
  std::string error;  // non-empty when the tile did not decode
};

struct JpegInput {
  const uint8_t* data;
  size_t size;
};

// The frame size every input must declare (before scaling): width x height, or with `shorter_ok`
// (strips: the last one of an image) width x 1..height. width 0: no check.
struct JpegExpect {
  unsigned width = 0;
  unsigned height = 0;
  bool shorter_ok = false;
};

// Where the decoded rows go. Once the frame header is read and checked, `layout` is called with the
// output size (after scaling) and returns out_h writable row pointers of out_w * 3 bytes each (owned
// by ctx; rows whose pixels are not wanted may share one scratch row), or nullptr with *error set.
// It must not throw (it runs between libjpeg's setjmp and longjmp).
struct JpegRowTarget {
  uint8_t** (*layout)(void* ctx, unsigned out_w, unsigned out_h, std::string* error);
  void* ctx;
};

// Decodes one stream to RGB at 1/scale_denom size into the rows `target` gives. Returns the error
// message, empty on success. No allocation beyond libjpeg's own; safe to call from any thread.
std::string decode_jpeg_rows(const JpegInput& in, const JpegExpect& expect, int scale_denom,
                             const JpegRowTarget& target);

// Decodes every input to RGB at 1/scale_denom size (1, 2, 4 or 8) on `threads` threads. A frame not
// of the expected size, or one too large to be a tile, gives an error, not a decode.
std::vector<DecodedTile> decode_jpeg_batch(const std::vector<JpegInput>& tiles, const JpegExpect& expect,
                                           int scale_denom, int threads);

}  // namespace proalign

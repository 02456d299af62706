// The tile codecs of the patch stream other than JPEG: TIFF LZW, Deflate (zlib), uncompressed, the
// TIFF horizontal predictor, and JPEG 2000 through an OpenJPEG library loaded at run time (the
// one imagecodecs ships, found by the Python side), plus Aperio's YCbCr -> RGB for 33003 tiles.
// Each one writes the same pixels as decode/cpu.py's decode_tile (tests/test_patch_engine.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace proalign {

// TIFF LZW (MSB-first codes, 9-12 bits, early change; or libtiff's old LSB-first flavour) into
// out[0..limit); *n_out: bytes written. `out` must have 16 writable bytes past `limit` (strings are
// copied 16 bytes at a time). Output that would pass `limit` is an error (a decompression bomb), as
// decode/cpu.py's _unlzw.
std::string lzw_decode(const uint8_t* in, size_t n, uint8_t* out, size_t limit, size_t* n_out);

// zlib-wrapped Deflate into out[0..limit), the same rules as decode/cpu.py's _inflate.
std::string inflate_tile(const uint8_t* in, size_t n, uint8_t* out, size_t limit, size_t* n_out);

// TIFF predictor 2 on 8-bit samples: a running sum along each row, per sample, modulo 256.
void undo_horizontal_predictor(uint8_t* data, size_t rows, size_t width, size_t spp);

// Aperio 33003 tiles: full-range BT.601 YCbCr -> RGB in float32, rounded half to even and clipped,
// the same arithmetic as decode/cpu.py's ycbcr_to_rgb (numpy float32), so the same bytes.
void ycbcr_to_rgb_row(uint8_t* rgb, size_t n);

// OpenJPEG, loaded with dlopen from `path`; returns its version, or throws with the reason.
std::string load_openjpeg(const std::string& path);
bool openjpeg_loaded();

// A decoded JPEG 2000 tile: RGB rows, 8-bit samples, width x height.
struct J2kImage;
class J2kDecoded {
 public:
  J2kDecoded() = default;
  ~J2kDecoded();
  J2kDecoded(const J2kDecoded&) = delete;
  J2kDecoded& operator=(const J2kDecoded&) = delete;
  int width() const { return width_; }
  int height() const { return height_; }
  // Row y as RGB into dst (width * 3 bytes); ycbcr: Aperio 33003's colour transform.
  void row(int y, uint8_t* dst, bool ycbcr) const;
  void reset();

 private:
  friend std::string decode_j2k(const uint8_t*, size_t, unsigned, unsigned, bool, J2kDecoded*);
  void* image_ = nullptr;  // opj_image_t*
  const int32_t* comp_[3] = {nullptr, nullptr, nullptr};
  int width_ = 0, height_ = 0;
};

// Decodes a JPEG 2000 codestream (or JP2 file) after checking, for a raw codestream, that its SIZ
// gives the tile's size (expect_w x expect_h; shorter_ok: a strip may be shorter). Returns the error.
std::string decode_j2k(const uint8_t* data, size_t n, unsigned expect_w, unsigned expect_h, bool shorter_ok,
                       J2kDecoded* out);

}  // namespace proalign

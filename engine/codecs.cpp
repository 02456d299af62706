#include "codecs.hpp"

#include <dlfcn.h>
#ifdef PROALIGN_WITH_ZLIB
#include <zlib.h>
#endif

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace proalign {

// ---------------------------------------------------------------------------------------------------
// TIFF LZW. Codes 0-255 are bytes, 256 clears the table, 257 ends the data, 258.. are table entries
// (an earlier entry plus one byte). New-style data (TIFF 6) are MSB-first and widen the code one
// entry early; old-style data (libtiff's "compat" streams, first byte 0 and the next one odd) are
// LSB-first and widen on time. A stream without an end code stops where its bits run out.
namespace {

std::string lzw_too_big(size_t limit) {
  return "LZW data expand to more than the tile's " + std::to_string(limit) + " bytes (corrupt tile)";
}

// Every table entry is a string the output already holds (the previous code's string plus the
// first byte after it), so the table keeps a pointer to where that string starts and its length;
// bytes point into a constant table. Decoding a code is then one 16-byte load and store for the
// usual short strings, with no branch on the kind of code: the source always ends before `pos`,
// so the load reads only finished bytes (and don't-care ones past the string's end).
const uint8_t* byte_table() {
  static const struct Bytes {
    uint8_t v[256 + 16];
    Bytes() {
      for (int i = 0; i < 256 + 16; ++i) v[i] = static_cast<uint8_t>(i);
    }
  } table;
  return table.v;
}

inline void copy16(uint8_t* dst, const uint8_t* src) {
  uint8_t tmp[16];
  std::memcpy(tmp, src, 16);
  std::memcpy(dst, tmp, 16);
}

template <bool kMsb>
std::string lzw_run(const uint8_t* in, size_t n, uint8_t* out, size_t limit, size_t* n_out) {
  static thread_local const uint8_t* start[4096];
  static thread_local uint16_t length[4096];
  const uint8_t* bytes = byte_table();
  for (int c = 0; c < 256; ++c) {
    start[c] = bytes + c;
    length[c] = 1;
  }
  const int early = kMsb ? 1 : 0;
  size_t pos = 0, i = 0;
  uint64_t bits = 0;
  int nbits = 0, width = 9;
  int next = 258;
  bool have_old = false;
  const uint8_t* old_start = nullptr;
  size_t old_len = 0;
  for (;;) {
    if (nbits < width) {
      while (nbits <= 56 && i < n) {
        if (kMsb) {
          bits |= static_cast<uint64_t>(in[i++]) << (56 - nbits);
        } else {
          bits |= static_cast<uint64_t>(in[i++]) << nbits;
        }
        nbits += 8;
      }
      if (nbits < width) break;  // no end code: the data stop here
    }
    int code;
    if (kMsb) {
      code = static_cast<int>(bits >> (64 - width));
      bits <<= width;
    } else {
      code = static_cast<int>(bits & ((1u << width) - 1));
      bits >>= width;
    }
    nbits -= width;
    if (code == 256 || code == 257) {
      if (code == 257) break;
      width = 9;
      next = 258;
      have_old = false;
      continue;
    }
    size_t len;
    const uint8_t* src;
    if (code < next) {
      if (code > 257 && !have_old) return "corrupt LZW data: the first code after a clear is not a byte";
      src = start[code];
      len = length[code];
    } else if (code == next && have_old && next < 4096) {  // the entry being defined: old + its first byte
      src = old_start;
      len = old_len + 1;
    } else {
      return "corrupt LZW data: code " + std::to_string(code) + " is not in the table";
    }
    if (pos + len > limit) return lzw_too_big(limit);
    uint8_t* dst = out + pos;
    copy16(dst, src);
    for (size_t k = 16; k < len; k += 16) copy16(dst + k, src + k);
    if (code == next) dst[len - 1] = old_start[0];  // its last byte is its own first one
    if (have_old && next < 4096) {  // old's string plus this one's first byte: already in the output
      start[next] = old_start;
      length[next] = static_cast<uint16_t>(std::min<size_t>(old_len + 1, 0xFFFF));
      ++next;
      if (next + early >= (1 << width) && width < 12) ++width;
    }
    have_old = true;
    old_start = dst;
    old_len = len;
    pos += len;
  }
  *n_out = pos;
  return std::string();
}

}  // namespace

std::string lzw_decode(const uint8_t* in, size_t n, uint8_t* out, size_t limit, size_t* n_out) {
  *n_out = 0;
  if (n >= 2 && in[0] == 0 && (in[1] & 1)) return lzw_run<false>(in, n, out, limit, n_out);
  return lzw_run<true>(in, n, out, limit, n_out);
}

// ---------------------------------------------------------------------------------------------------
#ifndef PROALIGN_WITH_ZLIB
std::string inflate_tile(const uint8_t*, size_t, uint8_t*, size_t, size_t* n_out) {
  *n_out = 0;
  return "Deflate tiles need zlib when proalign._C is built";
}
#else
std::string inflate_tile(const uint8_t* in, size_t n, uint8_t* out, size_t limit, size_t* n_out) {
  *n_out = 0;
  z_stream zs;
  std::memset(&zs, 0, sizeof(zs));
  if (inflateInit(&zs) != Z_OK) return "error: zlib could not start";
  // one byte more than the tile may hold: a full buffer means the data inflate past the tile
  uint8_t extra = 0;
  zs.next_in = const_cast<Bytef*>(in);
  zs.avail_in = static_cast<uInt>(n);
  zs.next_out = out;
  zs.avail_out = static_cast<uInt>(limit);
  int rc = inflate(&zs, Z_SYNC_FLUSH);
  while (rc == Z_OK && zs.avail_out > 0 && zs.avail_in > 0) rc = inflate(&zs, Z_SYNC_FLUSH);
  if (rc == Z_OK && zs.avail_out == 0) {  // the tile is full: is there more?
    zs.next_out = &extra;
    zs.avail_out = 1;
    rc = inflate(&zs, Z_SYNC_FLUSH);
    if (zs.avail_out == 0) {
      inflateEnd(&zs);
      return "Deflate data inflate to more than the tile's " + std::to_string(limit) + " bytes (corrupt tile)";
    }
  }
  const bool ended = rc == Z_STREAM_END;
  std::string msg = zs.msg ? zs.msg : "";
  *n_out = std::min<size_t>(zs.total_out, limit);
  inflateEnd(&zs);
  if (rc == Z_DATA_ERROR || rc == Z_STREAM_ERROR || rc == Z_MEM_ERROR || rc == Z_NEED_DICT)
    return "error: Error " + std::to_string(rc) + " while decompressing data: " + (msg.empty() ? "corrupt" : msg);
  if (!ended) return "Deflate stream is truncated (corrupt tile)";
  return std::string();
}
#endif

void undo_horizontal_predictor(uint8_t* data, size_t rows, size_t width, size_t spp) {
  for (size_t y = 0; y < rows; ++y) {
    uint8_t* row = data + y * width * spp;
    if (spp == 3) {  // the running sums in registers, not read back from memory
      uint8_t a = row[0], b = row[1], c = row[2];
      for (size_t x = 1; x < width; ++x) {
        uint8_t* p = row + 3 * x;
        a = static_cast<uint8_t>(a + p[0]);
        b = static_cast<uint8_t>(b + p[1]);
        c = static_cast<uint8_t>(c + p[2]);
        p[0] = a;
        p[1] = b;
        p[2] = c;
      }
      continue;
    }
    for (size_t x = spp; x < width * spp; ++x) row[x] = static_cast<uint8_t>(row[x] + row[x - spp]);
  }
}

// ---------------------------------------------------------------------------------------------------
// float32 throughout, each product and sum rounded on its own (this file is built without FMA
// contraction), as numpy evaluates ycbcr_to_rgb; rint rounds half to even like np.rint.
void ycbcr_to_rgb_row(uint8_t* rgb, size_t n) {
  const float k_r = 1.402f, k_gb = 0.344136f, k_gr = 0.714136f, k_b = 1.772f;
  for (size_t i = 0; i < n; ++i) {
    uint8_t* p = rgb + 3 * i;
    const float y = static_cast<float>(p[0]);
    const float cb = static_cast<float>(p[1]) - 128.0f;
    const float cr = static_cast<float>(p[2]) - 128.0f;
    const float prod_r = k_r * cr;
    const float r = y + prod_r;
    const float prod_gb = k_gb * cb;
    const float g0 = y - prod_gb;
    const float prod_gr = k_gr * cr;
    const float g = g0 - prod_gr;
    const float prod_b = k_b * cb;
    const float b = y + prod_b;
    const float v[3] = {std::nearbyint(r), std::nearbyint(g), std::nearbyint(b)};
    for (int c = 0; c < 3; ++c) p[c] = static_cast<uint8_t>(v[c] < 0.0f ? 0.0f : (v[c] > 255.0f ? 255.0f : v[c]));
  }
}

// ---------------------------------------------------------------------------------------------------
// OpenJPEG through dlopen: only the C API's stable parts are declared here (its opaque handles,
// the image structs of openjpeg.h 2.x, and the stream callbacks).
namespace {

struct OpjImageComp {
  uint32_t dx, dy, w, h, x0, y0, prec, bpp, sgnd, resno_decoded, factor;
  int32_t* data;
  uint16_t alpha;
};
struct OpjImage {
  uint32_t x0, y0, x1, y1, numcomps;
  int color_space;
  OpjImageComp* comps;
  uint8_t* icc_profile_buf;
  uint32_t icc_profile_len;
};
using OpjBool = int;
using OpjMsg = void (*)(const char*, void*);
using OpjRead = size_t (*)(void*, size_t, void*);
using OpjSkip = int64_t (*)(int64_t, void*);
using OpjSeek = OpjBool (*)(int64_t, void*);

struct OpjApi {
  const char* (*version)();
  void* (*create_decompress)(int);
  void (*set_default_decoder_parameters)(void*);
  OpjBool (*setup_decoder)(void*, void*);
  OpjBool (*set_error_handler)(void*, OpjMsg, void*);
  OpjBool (*set_warning_handler)(void*, OpjMsg, void*);
  OpjBool (*set_info_handler)(void*, OpjMsg, void*);
  void* (*stream_create)(size_t, OpjBool);
  void (*stream_set_read_function)(void*, OpjRead);
  void (*stream_set_skip_function)(void*, OpjSkip);
  void (*stream_set_seek_function)(void*, OpjSeek);
  void (*stream_set_user_data)(void*, void*, void (*)(void*));
  void (*stream_set_user_data_length)(void*, uint64_t);
  void (*stream_destroy)(void*);
  OpjBool (*read_header)(void*, void*, OpjImage**);
  OpjBool (*decode)(void*, void*, OpjImage*);
  OpjBool (*end_decompress)(void*, void*);
  void (*destroy_codec)(void*);
  void (*image_destroy)(OpjImage*);
};

std::mutex g_opj_mu;
const OpjApi* g_opj = nullptr;
std::string g_opj_version;

struct MemStream {
  const uint8_t* data;
  size_t size;
  size_t pos;
};

size_t mem_read(void* buf, size_t nb, void* user) {
  auto* m = static_cast<MemStream*>(user);
  if (m->pos >= m->size) return static_cast<size_t>(-1);
  const size_t n = std::min(nb, m->size - m->pos);
  std::memcpy(buf, m->data + m->pos, n);
  m->pos += n;
  return n;
}

int64_t mem_skip(int64_t nb, void* user) {
  auto* m = static_cast<MemStream*>(user);
  if (nb < 0) {
    if (static_cast<uint64_t>(-nb) > m->pos) return -1;
    m->pos -= static_cast<size_t>(-nb);
    return nb;
  }
  const size_t n = std::min(static_cast<size_t>(nb), m->size - std::min(m->pos, m->size));
  m->pos += n;
  return static_cast<int64_t>(n);
}

OpjBool mem_seek(int64_t nb, void* user) {
  auto* m = static_cast<MemStream*>(user);
  if (nb < 0 || static_cast<uint64_t>(nb) > m->size) return 0;
  m->pos = static_cast<size_t>(nb);
  return 1;
}

void keep_error(const char* msg, void* user) {
  auto* s = static_cast<std::string*>(user);
  if (s->empty() && msg) {
    *s = msg;
    while (!s->empty() && (s->back() == '\n' || s->back() == ' ')) s->pop_back();
  }
}

template <typename F>
void resolve(void* lib, const char* name, F* fn) {
  void* p = dlsym(lib, name);
  if (p == nullptr) throw std::runtime_error(std::string("OpenJPEG library has no ") + name);
  *fn = reinterpret_cast<F>(p);
}

}  // namespace

std::string load_openjpeg(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_opj_mu);
  if (g_opj != nullptr) return g_opj_version;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) throw std::runtime_error(std::string("cannot load OpenJPEG: ") + dlerror());
  auto* api = new OpjApi();
  try {
    resolve(lib, "opj_version", &api->version);
    resolve(lib, "opj_create_decompress", &api->create_decompress);
    resolve(lib, "opj_set_default_decoder_parameters", &api->set_default_decoder_parameters);
    resolve(lib, "opj_setup_decoder", &api->setup_decoder);
    resolve(lib, "opj_set_error_handler", &api->set_error_handler);
    resolve(lib, "opj_set_warning_handler", &api->set_warning_handler);
    resolve(lib, "opj_set_info_handler", &api->set_info_handler);
    resolve(lib, "opj_stream_create", &api->stream_create);
    resolve(lib, "opj_stream_set_read_function", &api->stream_set_read_function);
    resolve(lib, "opj_stream_set_skip_function", &api->stream_set_skip_function);
    resolve(lib, "opj_stream_set_seek_function", &api->stream_set_seek_function);
    resolve(lib, "opj_stream_set_user_data", &api->stream_set_user_data);
    resolve(lib, "opj_stream_set_user_data_length", &api->stream_set_user_data_length);
    resolve(lib, "opj_stream_destroy", &api->stream_destroy);
    resolve(lib, "opj_read_header", &api->read_header);
    resolve(lib, "opj_decode", &api->decode);
    resolve(lib, "opj_end_decompress", &api->end_decompress);
    resolve(lib, "opj_destroy_codec", &api->destroy_codec);
    resolve(lib, "opj_image_destroy", &api->image_destroy);
  } catch (...) {
    delete api;
    dlclose(lib);
    throw;
  }
  const std::string version = api->version();
  // the image structs above are those of OpenJPEG 2.x (2.1 onwards)
  const bool two_one_plus = version.size() >= 3 && version[0] == '2' && version[1] == '.' &&
                            std::atoi(version.c_str() + 2) >= 1;
  if (!two_one_plus) {
    delete api;
    dlclose(lib);
    throw std::runtime_error("OpenJPEG " + version + " is not a 2.1+ library");
  }
  g_opj_version = version;
  g_opj = api;  // never unloaded: decoders on other threads may hold its functions
  return g_opj_version;
}

bool openjpeg_loaded() {
  std::lock_guard<std::mutex> lock(g_opj_mu);
  return g_opj != nullptr;
}

J2kDecoded::~J2kDecoded() { reset(); }

void J2kDecoded::reset() {
  if (image_ != nullptr) g_opj->image_destroy(static_cast<OpjImage*>(image_));
  image_ = nullptr;
  comp_[0] = comp_[1] = comp_[2] = nullptr;
  width_ = height_ = 0;
}

void J2kDecoded::row(int y, uint8_t* dst, bool ycbcr) const {
  const size_t off = static_cast<size_t>(y) * static_cast<size_t>(width_);
  const int32_t *a = comp_[0] + off, *b = comp_[1] + off, *c = comp_[2] + off;
  for (int x = 0; x < width_; ++x) {
    dst[3 * x] = static_cast<uint8_t>(a[x]);
    dst[3 * x + 1] = static_cast<uint8_t>(b[x]);
    dst[3 * x + 2] = static_cast<uint8_t>(c[x]);
  }
  if (ycbcr) ycbcr_to_rgb_row(dst, static_cast<size_t>(width_));
}

std::string decode_j2k(const uint8_t* data, size_t n, unsigned expect_w, unsigned expect_h, bool shorter_ok,
                       J2kDecoded* out) {
  out->reset();
  const OpjApi* api;
  {
    std::lock_guard<std::mutex> lock(g_opj_mu);
    api = g_opj;
  }
  if (api == nullptr) return "no OpenJPEG library loaded";
  const bool codestream = n >= 4 && data[0] == 0xFF && data[1] == 0x4F && data[2] == 0xFF && data[3] == 0x51;
  if (codestream && expect_w) {  // the SIZ segment: the frame must be the tile's size before decoding
    if (n < 24) return "no JPEG 2000 frame header (corrupt tile)";
    auto be32 = [&](size_t i) {
      return (uint32_t{data[i]} << 24) | (uint32_t{data[i + 1]} << 16) | (uint32_t{data[i + 2]} << 8) | data[i + 3];
    };
    const int64_t w = int64_t{be32(8)} - be32(16), h = int64_t{be32(12)} - be32(20);
    if (w != expect_w || !(h == expect_h || (shorter_ok && h >= 1 && h < expect_h)))
      return "JPEG 2000 frame is " + std::to_string(w) + "x" + std::to_string(h) + " px but the " +
             (shorter_ok ? "strip" : "tile") + " is " + std::to_string(expect_w) + "x" + std::to_string(expect_h) +
             " px (corrupt tile)";
  }
  const bool jp2 = n >= 12 && std::memcmp(data + 4, "jP  ", 4) == 0;
  if (!codestream && !jp2) return "not a JPEG 2000 codestream (corrupt tile)";
  std::string error;
  MemStream mem{data, n, 0};
  void* codec = api->create_decompress(jp2 ? 2 : 0);  // OPJ_CODEC_JP2 : OPJ_CODEC_J2K
  if (codec == nullptr) return "OpenJPEG could not create a decoder";
  api->set_error_handler(codec, keep_error, &error);
  api->set_warning_handler(codec, nullptr, nullptr);
  api->set_info_handler(codec, nullptr, nullptr);
  alignas(16) static thread_local uint8_t params[1 << 16];  // opj_dparameters_t is about 8.3 KB in 2.x
  std::memset(params, 0, sizeof(params));
  api->set_default_decoder_parameters(params);
  void* stream = api->stream_create(std::min<size_t>(n ? n : 1, size_t{1} << 20), 1);
  OpjImage* image = nullptr;
  bool ok = false, frame_error = false;
  if (stream != nullptr && api->setup_decoder(codec, params)) {
    api->stream_set_read_function(stream, mem_read);
    api->stream_set_skip_function(stream, mem_skip);
    api->stream_set_seek_function(stream, mem_seek);
    api->stream_set_user_data(stream, &mem, nullptr);
    api->stream_set_user_data_length(stream, n);
    ok = api->read_header(stream, codec, &image) && image != nullptr;
    if (ok && codestream && expect_w) {  // what OpenJPEG read must be what SIZ said
      const int64_t w = int64_t{image->x1} - image->x0, h = int64_t{image->y1} - image->y0;
      if (w != expect_w || !(h == expect_h || (shorter_ok && h >= 1 && h < expect_h))) {
        error = "JPEG 2000 frame is " + std::to_string(w) + "x" + std::to_string(h) + " px but the " +
                (shorter_ok ? "strip" : "tile") + " is " + std::to_string(expect_w) + "x" + std::to_string(expect_h) +
                " px (corrupt tile)";
        ok = false;
        frame_error = true;
      }
    }
    ok = ok && api->decode(codec, stream, image) && api->end_decompress(codec, stream);
  }
  if (stream != nullptr) api->stream_destroy(stream);
  api->destroy_codec(codec);
  if (!ok) {
    if (image != nullptr) api->image_destroy(image);
    if (frame_error) return error;
    return "JPEG 2000: " + (error.empty() ? std::string("OpenJPEG could not decode the tile") : error);
  }
  out->image_ = image;
  const int64_t w = int64_t{image->x1} - image->x0, h = int64_t{image->y1} - image->y0;
  const uint32_t nc = image->numcomps;
  bool layout_ok = (nc == 1 || nc == 3 || nc == 4) && image->comps != nullptr && w > 0 && h > 0;
  for (uint32_t c = 0; layout_ok && c < std::min<uint32_t>(nc, 3); ++c) {
    const OpjImageComp& k = image->comps[c];
    layout_ok = k.dx == 1 && k.dy == 1 && k.w == w && k.h == h && k.prec >= 1 && k.prec <= 8 && !k.sgnd &&
                k.data != nullptr;
  }
  if (!layout_ok) {
    out->reset();
    return "unsupported JPEG 2000 layout (the engine reads 1, 3 or 4 unsigned 8-bit components at full size)";
  }
  for (int c = 0; c < 3; ++c) out->comp_[c] = image->comps[nc == 1 ? 0 : c].data;
  out->width_ = static_cast<int>(w);
  out->height_ = static_cast<int>(h);
  return std::string();
}

}  // namespace proalign

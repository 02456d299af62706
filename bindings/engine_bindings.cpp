// engine/ in proalign._C: TileReader and TileStream. Reads and waits run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

#include "tile_reader.hpp"
#ifdef PROALIGN_WITH_LIBJPEG
#include "jpeg_decoder.hpp"
#include "patch_stream.hpp"
#endif

namespace py = pybind11;
using proalign::TileBytes;
using proalign::TileReader;
using proalign::TileRef;
using proalign::TileStream;

namespace {

using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

std::vector<TileRef> to_refs(const U64Array& offsets, const U64Array& sizes) {
  if (offsets.ndim() != 1 || sizes.ndim() != 1 || offsets.shape(0) != sizes.shape(0))
    throw std::invalid_argument("offsets and sizes must be 1-D arrays of the same length");
  std::vector<TileRef> refs(offsets.shape(0));
  auto o = offsets.unchecked<1>();
  auto s = sizes.unchecked<1>();
  for (py::ssize_t i = 0; i < offsets.shape(0); ++i) refs[i] = TileRef{o(i), s(i)};
  return refs;
}

// (list of bytes, list of (position, error message)); an unreadable tile gives b"" and an entry.
py::tuple to_python(std::vector<TileBytes>& tiles) {
  py::list data(tiles.size());
  py::list errors;
  for (size_t i = 0; i < tiles.size(); ++i) {
    data[i] = py::bytes(tiles[i].data);
    if (!tiles[i].error.empty()) errors.append(py::make_tuple(i, tiles[i].error));
    std::string().swap(tiles[i].data);  // free as we go: the batch is held once, as Python bytes
  }
  return py::make_tuple(data, errors);
}

// Keeps the reader alive as long as a stream over it exists.
struct PyTileStream {
  std::shared_ptr<TileReader> reader;
  std::unique_ptr<TileStream> stream;
};

#ifdef PROALIGN_WITH_LIBJPEG
// A decoded tile's pixels as a (h, w, 3) array that owns them: moved, not copied, so no second
// tile-sized allocation can fail after the decode succeeded.
py::array pixels_array(proalign::DecodedTile* t) {
  auto* owned = new std::vector<uint8_t>(std::move(t->pixels));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<uint8_t>*>(p); });
  const py::ssize_t h = t->height, w = t->width;
  return py::array_t<uint8_t>({h, w, py::ssize_t{3}}, {w * 3, py::ssize_t{3}, py::ssize_t{1}}, owned->data(), owner);
}

struct PooledBuffer {
  std::shared_ptr<proalign::BufferPool> pool;
  uint8_t* pixels;
};

struct PyPatchStream {
  std::shared_ptr<TileReader> reader;
  std::unique_ptr<proalign::PatchStream> stream;
  int64_t r = 0;
};
#endif

}  // namespace

void register_engine(py::module_& mod) {
  py::class_<TileReader, std::shared_ptr<TileReader>>(mod, "TileReader",
                                                      "Parallel positional reads of compressed tiles from one file")
      .def(py::init([](const std::string& path, py::bytes prefix, bool splice_jpeg, int threads) {
             return std::make_shared<TileReader>(path, std::string(prefix), splice_jpeg, threads);
           }),
           py::arg("path"), py::arg("prefix") = py::bytes(), py::arg("splice_jpeg") = false, py::arg("threads") = 4)
      .def(
          "read",
          [](const TileReader& self, const U64Array& offsets, const U64Array& sizes) {
            auto refs = to_refs(offsets, sizes);
            std::vector<TileBytes> tiles;
            {
              py::gil_scoped_release release;
              tiles = self.read(refs);
            }
            return to_python(tiles);
          },
          py::arg("offsets"), py::arg("sizes"), "Read tiles; returns (list of bytes, list of (i, error))")
      .def_property_readonly("file_size", &TileReader::file_size)
      .def_property_readonly("threads", &TileReader::threads);

  py::class_<PyTileStream>(mod, "TileStream", "Batches of tiles read ahead on a background thread, bounded queue")
      .def(py::init([](std::shared_ptr<TileReader> reader, const std::vector<std::pair<U64Array, U64Array>>& batches,
                       int max_ahead) {
             std::vector<std::vector<TileRef>> refs;
             refs.reserve(batches.size());
             for (const auto& b : batches) refs.push_back(to_refs(b.first, b.second));
             auto s = std::make_unique<PyTileStream>();
             s->reader = reader;
             s->stream = std::make_unique<TileStream>(*reader, std::move(refs), max_ahead);
             return s;
           }),
           py::arg("reader"), py::arg("batches"), py::arg("max_ahead") = 2)
      .def("__iter__", [](PyTileStream& self) -> PyTileStream& { return self; })
      .def("__next__",
           [](PyTileStream& self) {
             std::vector<TileBytes> tiles;
             bool more;
             {
               py::gil_scoped_release release;
               more = self.stream->next(&tiles);
             }
             if (!more) throw py::stop_iteration();
             return to_python(tiles);
           })
      .def_property_readonly("max_queued", [](const PyTileStream& self) { return self.stream->max_queued(); });

#ifdef PROALIGN_WITH_LIBJPEG
  mod.def(
      "decode_jpeg",
      [](const py::list& tiles, int scale_denom, int threads, unsigned width, unsigned height, bool shorter_ok) {
        if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8)
          throw std::invalid_argument("scale_denom must be 1, 2, 4 or 8");
        const proalign::JpegExpect expect{width, height, shorter_ok};
        std::vector<py::bytes> keep;  // the bytes objects stay alive (and immutable) while we decode
        std::vector<proalign::JpegInput> in;
        keep.reserve(tiles.size());
        in.reserve(tiles.size());
        for (auto item : tiles) {
          keep.push_back(item.cast<py::bytes>());
          char* buf = nullptr;
          py::ssize_t len = 0;
          PyBytes_AsStringAndSize(keep.back().ptr(), &buf, &len);
          in.push_back({reinterpret_cast<const uint8_t*>(buf), static_cast<size_t>(len)});
        }
        std::vector<proalign::DecodedTile> out;
        {
          py::gil_scoped_release release;
          out = proalign::decode_jpeg_batch(in, expect, scale_denom, threads);
        }
        py::list arrays(out.size());
        py::list errors;
        for (size_t i = 0; i < out.size(); ++i) {
          if (!out[i].error.empty()) {
            errors.append(py::make_tuple(i, out[i].error));
            arrays[i] = py::none();
            continue;
          }
          arrays[i] = pixels_array(&out[i]);
        }
        return py::make_tuple(arrays, errors);
      },
      py::arg("tiles"), py::arg("scale_denom") = 1, py::arg("threads") = 4, py::arg("width") = 0,
      py::arg("height") = 0, py::arg("shorter_ok") = false,
      "Decode JPEG streams to RGB uint8 (h, w, 3) at 1/scale_denom size; returns (arrays, [(i, error)]).\n"
      "width/height (before scaling): the frame size each stream must declare (0: unchecked); shorter_ok: "
      "the height may be less (strips)");
  mod.attr("HAS_LIBJPEG") = true;

  py::class_<PyPatchStream>(mod, "PatchStream",
                            "Finished patch batches from the stored tiles of one level (JPEG, JPEG 2000, LZW, Deflate, "
                            "raw), read, decoded and placed by C++ worker threads: each tile once, a tile one patch "
                            "covers decoded in place")
      .def(py::init([](std::shared_ptr<TileReader> reader, int64_t width, int64_t height, int64_t tile_w,
                       int64_t tile_h, int64_t tiles_across, int64_t read_size, int scale, unsigned expect_w,
                       unsigned expect_h, bool shorter_ok, int fill, const U64Array& offsets,
                       const U64Array& sizes, py::array_t<int64_t, py::array::c_style | py::array::forcecast> origins,
                       int batch_size, int threads, int max_ahead, const std::string& codec, int samples,
                       bool predictor, bool ycbcr) {
             if (scale != 1 && scale != 2 && scale != 4 && scale != 8)
               throw std::invalid_argument("scale must be 1, 2, 4 or 8");
             if (fill < 0 || fill > 255) throw std::invalid_argument("fill must be 0-255");
             if (origins.ndim() != 2 || origins.shape(1) != 2) throw std::invalid_argument("origins must be (n, 2)");
             proalign::PatchGeometry g;
             g.width = width;
             g.height = height;
             g.tile_w = tile_w;
             g.tile_h = tile_h;
             g.tiles_across = tiles_across;
             g.read_size = read_size;
             g.scale = scale;
             g.expect = proalign::JpegExpect{expect_w, expect_h, shorter_ok};
             g.fill = static_cast<uint8_t>(fill);
             if (codec == "jpeg") {
               g.codec = proalign::TileCodec::kJpeg;
             } else if (codec == "jpeg2000") {
               g.codec = proalign::TileCodec::kJpeg2000;
             } else if (codec == "lzw") {
               g.codec = proalign::TileCodec::kLzw;
             } else if (codec == "deflate") {
               g.codec = proalign::TileCodec::kDeflate;
             } else if (codec == "none") {
               g.codec = proalign::TileCodec::kNone;
             } else {
               throw std::invalid_argument("codec must be jpeg, jpeg2000, lzw, deflate or none");
             }
             g.samples = samples;
             g.predictor = predictor;
             g.ycbcr = ycbcr;
             std::vector<int64_t> o(origins.data(), origins.data() + origins.size());
             auto s = std::make_unique<PyPatchStream>();
             s->reader = reader;
             s->r = read_size;
             s->stream = std::make_unique<proalign::PatchStream>(*reader, g, to_refs(offsets, sizes), std::move(o),
                                                                 batch_size, threads, max_ahead);
             return s;
           }),
           py::arg("reader"), py::arg("width"), py::arg("height"), py::arg("tile_width"), py::arg("tile_height"),
           py::arg("tiles_across"), py::arg("read_size"), py::arg("scale"), py::arg("expect_width"),
           py::arg("expect_height"), py::arg("shorter_ok"), py::arg("fill"), py::arg("offsets"), py::arg("sizes"),
           py::arg("origins"), py::arg("batch_size") = 64, py::arg("threads") = 2, py::arg("max_ahead") = 2,
           py::arg("codec") = "jpeg", py::arg("samples") = 3, py::arg("predictor") = false, py::arg("ycbcr") = false)
      .def("__iter__", [](PyPatchStream& self) -> PyPatchStream& { return self; })
      .def("__next__",
           [](PyPatchStream& self) -> py::tuple {
             proalign::PatchBatch b;
             bool more;
             {
               py::gil_scoped_release release;
               more = self.stream->next(&b);
             }
             if (!more) throw py::stop_iteration();
             if (b.failed)
               return py::make_tuple(py::none(), py::make_tuple(b.tile, b.decode_error, b.error));
             // the buffer goes back to the stream's pool when Python frees the array
             auto* held = new PooledBuffer{self.stream->pool(), b.pixels};
             py::capsule owner(held, [](void* p) {
               auto* h = static_cast<PooledBuffer*>(p);
               h->pool->give(h->pixels);
               delete h;
             });
             const py::ssize_t n = static_cast<py::ssize_t>(b.count), r = self.r;
             py::array_t<uint8_t> a({n, r, r, py::ssize_t{3}}, {r * r * 3, r * 3, py::ssize_t{3}, py::ssize_t{1}},
                                    b.pixels, owner);
             return py::make_tuple(a, py::none());
           },
           "(uint8 (count, r, r, 3) batch, None), or (None, (linear tile index, decode error?, message)) when a "
           "tile failed; StopIteration at the end")
      .def_property_readonly("tiles_needed", [](const PyPatchStream& s) { return s.stream->tiles_needed(); })
      .def_property_readonly("tiles_decoded", [](const PyPatchStream& s) { return s.stream->tiles_decoded(); })
      .def_property_readonly("direct_tiles", [](const PyPatchStream& s) { return s.stream->direct_tiles(); })
      .def_property_readonly("peak_cached_tiles", [](const PyPatchStream& s) { return s.stream->peak_cached_tiles(); })
      .def_property_readonly("max_batches_ahead", [](const PyPatchStream& s) { return s.stream->max_batches_ahead(); })
      .def_property_readonly("threads", [](const PyPatchStream& s) { return s.stream->threads(); })
      .def_property_readonly("worker_wait_s", [](const PyPatchStream& s) { return s.stream->worker_wait_s(); },
                             "seconds the workers waited for the consumer (window full), all workers together")
      .def_property_readonly("consumer_wait_s", [](const PyPatchStream& s) { return s.stream->consumer_wait_s(); },
                             "seconds next() waited for its batch's tiles")
      .def_property_readonly("assemble_s", [](const PyPatchStream& s) { return s.stream->assemble_s(); },
                             "seconds next() spent pasting shared tiles into its batches");

  mod.def("load_openjpeg", &proalign::load_openjpeg, py::arg("path"),
          "Load OpenJPEG 2.1+ (a libopenjp2 shared library) for the patch stream's JPEG 2000 tiles; returns its "
          "version, raises RuntimeError when it cannot");
  mod.def("openjpeg_loaded", &proalign::openjpeg_loaded);
#ifdef PROALIGN_WITH_ZLIB
  mod.attr("HAS_ZLIB") = true;
#else
  mod.attr("HAS_ZLIB") = false;
#endif
  mod.def(
      "decode_tiles",
      [](const py::list& tiles, const std::string& codec, unsigned width, unsigned height, int samples, bool predictor,
         bool ycbcr, bool shorter_ok) {
        // one tile at a time through the patch stream's codecs, for tests against decode/cpu.py
        py::list out;
        for (auto item : tiles) {
          std::string data = item.cast<std::string>();
          py::tuple one;
          {
            auto img = proalign::decode_tile_for_test(data, codec, width, height, samples, predictor, ycbcr, shorter_ok);
            if (!img.error.empty()) {
              one = py::make_tuple(py::none(), img.error);
            } else {
              one = py::make_tuple(pixels_array(&img), py::none());
            }
          }
          out.append(one);
        }
        return out;
      },
      py::arg("tiles"), py::arg("codec"), py::arg("width"), py::arg("height"), py::arg("samples") = 3,
      py::arg("predictor") = false, py::arg("ycbcr") = false, py::arg("shorter_ok") = false,
      "Decode tiles one by one with the patch stream's codecs: [(uint8 (h, w, 3) or None, error or None)]");
#else
  mod.attr("HAS_LIBJPEG") = false;
#endif
}

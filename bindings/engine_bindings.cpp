// engine/ in proalign._C: TileReader and TileStream. Reads and waits run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

#include "tile_reader.hpp"
#ifdef PROALIGN_WITH_LIBJPEG
#include "jpeg_decoder.hpp"
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
          py::array_t<uint8_t> a({out[i].height, out[i].width, 3});
          std::memcpy(a.mutable_data(), out[i].pixels.data(), out[i].pixels.size());
          arrays[i] = a;
        }
        return py::make_tuple(arrays, errors);
      },
      py::arg("tiles"), py::arg("scale_denom") = 1, py::arg("threads") = 4, py::arg("width") = 0,
      py::arg("height") = 0, py::arg("shorter_ok") = false,
      "Decode JPEG streams to RGB uint8 (h, w, 3) at 1/scale_denom size; returns (arrays, [(i, error)]).\n"
      "width/height (before scaling): the frame size each stream must declare (0: unchecked); shorter_ok: "
      "the height may be less (strips)");
  mod.attr("HAS_LIBJPEG") = true;
#else
  mod.attr("HAS_LIBJPEG") = false;
#endif
}

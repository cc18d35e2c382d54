// Output shapes of the onnx_codebook ops for onnxruntime's graph optimizers.  Without
// them the shape of everything after one of our ops is unknown, and layout passes
// skip it: the NCHWc pass, for one, only converts a MaxPool whose input channels are
// known (in NCHW a 2x2 MaxPool after a convolution measured 7x slower).
//
// Written against the C API so that nothing can throw into onnxruntime: dims that
// are unknown on the input stay unknown (symbolic ones keep their name), and a node
// whose attributes or input rank do not fit leaves its output unknown; the kernel
// reports the error when it is created or run.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "codebook_ops.h"

namespace onnx_codebook {

namespace {

const OrtApi& Api() { return Ort::GetApi(); }

// True for success; an error status is released.
bool Ok(OrtStatus* status) {
  if (status == nullptr) return true;
  Api().ReleaseStatus(status);
  return false;
}

// One dim: a size >= 0, or unknown (-1) and maybe named.
struct Dim {
  int64_t size = -1;
  std::string name;
};

bool InputShape(OrtShapeInferContext* ctx, size_t index, std::vector<Dim>* shape) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (!Ok(Api().ShapeInferContext_GetInputTypeShape(ctx, index, &info)) || info == nullptr) return false;
  size_t rank = 0;
  if (!Ok(Api().GetDimensionsCount(info, &rank))) return false;
  std::vector<int64_t> sizes(rank);
  std::vector<const char*> names(rank, nullptr);
  if (rank > 0 && (!Ok(Api().GetDimensions(info, sizes.data(), rank)) ||
                   !Ok(Api().GetSymbolicDimensions(info, names.data(), rank)))) {
    return false;
  }
  shape->assign(rank, Dim{});
  for (size_t i = 0; i < rank; ++i) {
    (*shape)[i].size = sizes[i] >= 0 ? sizes[i] : -1;
    if (names[i] != nullptr) (*shape)[i].name = names[i];
  }
  return true;
}

// Unknown dims without a name get a fresh one: a nameless -1 would reach the graph as
// the dim value -1.
bool SetOutputShape(OrtShapeInferContext* ctx, std::vector<Dim> shape) {
  static std::atomic<int64_t> unnamed{0};
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (!Ok(Api().CreateTensorTypeAndShapeInfo(&info))) return false;
  std::vector<int64_t> sizes;
  std::vector<const char*> names;
  for (Dim& d : shape) {
    if (d.size < 0 && d.name.empty()) d.name = "onnx_codebook_unk_" + std::to_string(unnamed++);
    sizes.push_back(d.size);
    names.push_back(d.name.c_str());
  }
  const bool ok = Ok(Api().SetTensorElementType(info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)) &&
                  Ok(Api().SetDimensions(info, sizes.data(), sizes.size())) &&
                  Ok(Api().SetSymbolicDimensions(info, names.data(), names.size())) &&
                  Ok(Api().ShapeInferContext_SetOutputTypeShape(ctx, 0, info));
  Api().ReleaseTensorTypeAndShapeInfo(info);
  return ok;
}

// The node's attribute `name` of `type`: false when it is missing or unreadable.
bool ReadAttr(OrtShapeInferContext* ctx, const char* name, OrtOpAttrType type, std::vector<char>* bytes) {
  const OrtOpAttr* attr = nullptr;
  if (!Ok(Api().ShapeInferContext_GetAttribute(ctx, name, &attr)) || attr == nullptr) return false;
  size_t size = 0;
  char probe = 0;
  if (Ok(Api().ReadOpAttr(attr, type, &probe, 0, &size))) {  // empty
    bytes->clear();
    return true;
  }
  bytes->assign(size, 0);
  return Ok(Api().ReadOpAttr(attr, type, bytes->data(), size, &size));
}

std::vector<int64_t> Ints(OrtShapeInferContext* ctx, const char* name, std::vector<int64_t> fallback) {
  std::vector<char> bytes;
  if (!ReadAttr(ctx, name, ORT_OP_ATTR_INTS, &bytes)) return fallback;
  std::vector<int64_t> v(bytes.size() / sizeof(int64_t));
  if (!v.empty()) std::memcpy(v.data(), bytes.data(), v.size() * sizeof(int64_t));
  return v;
}

int64_t Int(OrtShapeInferContext* ctx, const char* name, int64_t fallback) {
  std::vector<char> bytes;
  if (!ReadAttr(ctx, name, ORT_OP_ATTR_INT, &bytes) || bytes.size() != sizeof(int64_t)) return fallback;
  int64_t v = 0;
  std::memcpy(&v, bytes.data(), sizeof(v));
  return v;
}

std::string String(OrtShapeInferContext* ctx, const char* name, const std::string& fallback) {
  std::vector<char> bytes;
  if (!ReadAttr(ctx, name, ORT_OP_ATTR_STRING, &bytes)) return fallback;
  return std::string(bytes.data(), bytes.size()).c_str();  // up to a terminating NUL, if any
}

// Runs an inference body: any exception leaves the output unknown (the kernel
// reports the problem when it is created or run), never reaches onnxruntime.
template <typename Body>
OrtStatusPtr Infer(Body&& body) noexcept {
  try {
    body();
  } catch (...) {
  }
  return nullptr;
}

// What the Conv and ConvTranspose inferences read: a 1-D or 2-D weight_shape, an
// input of its rank, and spatial attributes of the right lengths (false otherwise).
struct ConvInputs {
  std::vector<int64_t> weight_shape, strides, dilations, pads;
  std::vector<Dim> x;
};
bool ReadConvInputs(OrtShapeInferContext* ctx, ConvInputs* c) {
  c->weight_shape = Ints(ctx, "weight_shape", {});
  const size_t rank = c->weight_shape.size(), spatial = rank - 2;
  if ((rank != 3 && rank != 4) || !InputShape(ctx, 0, &c->x) || c->x.size() != rank) return false;
  c->strides = Ints(ctx, "strides", std::vector<int64_t>(spatial, 1));
  c->dilations = Ints(ctx, "dilations", std::vector<int64_t>(spatial, 1));
  c->pads = Ints(ctx, "pads", std::vector<int64_t>(2 * spatial, 0));
  return c->strides.size() == spatial && c->dilations.size() == spatial && c->pads.size() == 2 * spatial;
}

}  // namespace

OrtStatusPtr ORT_API_CALL InferConvShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return Infer([&] {
    ConvInputs c;
    if (!ReadConvInputs(ctx, &c)) return;
    const size_t spatial = c.weight_shape.size() - 2;
    const std::string auto_pad = String(ctx, "auto_pad", "NOTSET");
    std::vector<Dim> y{c.x[0], Dim{c.weight_shape[0], ""}};
    for (size_t i = 0; i < spatial; ++i) {
      Dim out;
      if (c.x[2 + i].size >= 0) {
        try {
          int64_t lead = 0;
          ResolveAxis(kConvName, auto_pad, c.x[2 + i].size, c.weight_shape[2 + i], c.strides[i], c.dilations[i],
                      c.pads[i], c.pads[spatial + i], &out.size, &lead);
        } catch (...) {  // a kernel larger than the input: unknown here, an error when run
          out.size = -1;
        }
      }
      y.push_back(out);
    }
    SetOutputShape(ctx, y);
  });
}

OrtStatusPtr ORT_API_CALL InferGemmShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return Infer([&] {
    const std::vector<int64_t> w = Ints(ctx, "weight_shape", {});
    std::vector<Dim> a;
    if (w.size() != 2 || !InputShape(ctx, 0, &a) || a.size() != 2) return;
    const bool trans_a = Int(ctx, "transA", 0) != 0, trans_b = Int(ctx, "transB", 0) != 0;
    SetOutputShape(ctx, {a[trans_a ? 1 : 0], Dim{w[trans_b ? 0 : 1], ""}});
  });
}

OrtStatusPtr ORT_API_CALL InferMatMulShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return Infer([&] {
    const std::vector<int64_t> w = Ints(ctx, "weight_shape", {});
    std::vector<Dim> a;
    if (w.size() != 2 || !InputShape(ctx, 0, &a) || a.empty()) return;
    a.back() = Dim{w[1], ""};
    SetOutputShape(ctx, a);
  });
}

OrtStatusPtr ORT_API_CALL InferConvTransposeShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return Infer([&] {
    ConvInputs c;
    if (!ReadConvInputs(ctx, &c)) return;
    const size_t spatial = c.weight_shape.size() - 2;
    const std::vector<int64_t> extra = Ints(ctx, "output_padding", std::vector<int64_t>(spatial, 0));
    if (extra.size() != spatial) return;
    std::vector<Dim> y{c.x[0], Dim{c.weight_shape[1] * Int(ctx, "group", 1), ""}};
    for (size_t i = 0; i < spatial; ++i) {
      Dim out;
      if (c.x[2 + i].size >= 1) {
        const int64_t size = TransposedAxis(c.x[2 + i].size, c.weight_shape[2 + i], c.strides[i], c.dilations[i],
                                            c.pads[i], c.pads[spatial + i], extra[i]);
        if (size >= 1) out.size = size;  // else an error when run
      }
      y.push_back(out);
    }
    SetOutputShape(ctx, y);
  });
}

}  // namespace onnx_codebook

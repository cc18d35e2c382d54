// Entry point: registers the onnx_codebook domain with an onnxruntime session.
#include <mutex>
#include <vector>

#include "codebook_ops.h"

namespace {

const onnx_codebook::CodebookConvOp kConvOp;
const onnx_codebook::CodebookGemmOp kGemmOp;
const onnx_codebook::CodebookMatMulOp kMatMulOp;
const onnx_codebook::CodebookConvTransposeOp kConvTransposeOp;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base ? api_base->GetApi(ORT_API_VERSION) : nullptr;
  if (api == nullptr) return nullptr;  // cannot even report: onnxruntime older than our headers
  Ort::InitApi(api);
  return onnx_codebook::GuardStatus("RegisterCustomOps", [&] {
    // A domain must outlive every session that uses it; one per registration is
    // kept for the life of the process.
    static std::mutex mu;
    static std::vector<OrtCustomOpDomain*> domains;
    std::lock_guard<std::mutex> lock(mu);
    OrtCustomOpDomain* domain = nullptr;
    Ort::ThrowOnError(api->CreateCustomOpDomain(onnx_codebook::kDomain, &domain));
    domains.push_back(domain);
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &kConvOp));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &kGemmOp));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &kMatMulOp));
    Ort::ThrowOnError(api->CustomOpDomain_Add(domain, &kConvTransposeOp));
    Ort::ThrowOnError(api->AddCustomOpDomain(options, domain));
  });
}

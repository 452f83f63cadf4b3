#include "kvtier/runtime/model_catalog.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <vector>

#include <nlohmann/json.hpp>

namespace kvtier::runtime {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kGpuGroups =
    " core validate() accepts it, but the CUDA decode and append kernels take GQA groups 1, 2, 4 and 8 only "
    "(gpu/include/kvtier/gpu/kernels.h), so until they grow this group the model runs on the CPU backend only.";

ModelPreset make_model(std::string name, const DenseArchitecture& a, DType dtype, uint64_t max_positions,
                       std::string source, std::string notes) {
  ModelPreset m;
  m.name = std::move(name);
  m.shape = ModelShape{a.layers, a.q_heads, a.kv_heads, a.head_dim, dtype};
  m.max_positions = max_positions;
  m.parameters = estimate_parameters(a);
  m.weights_bytes = m.parameters * dtype_bytes(dtype);
  m.source = std::move(source);
  m.notes = std::move(notes);
  return m;
}

std::vector<ModelPreset> make_presets() {
  // {layers, q_heads, kv_heads, head_dim, hidden, intermediate, vocab, tied, qkv_bias}
  return {
      make_model("llama-3.1-8b", {32, 32, 8, 128, 4096, 14336, 128256, false, false}, DType::kBf16, 131072,
                 "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json: num_hidden_layers 32, "
                 "num_attention_heads 32, num_key_value_heads 8, hidden_size 4096 (head_dim 128), "
                 "intermediate_size 14336, vocab_size 128256, max_position_embeddings 131072, torch_dtype "
                 "bfloat16, untied; 8,030,261,248 parameters (model card: 8.03B).",
                 "128K context through rope_scaling llama3 (factor 8); GQA group 4."),
      make_model("llama-3.1-70b", {80, 64, 8, 128, 8192, 28672, 128256, false, false}, DType::kBf16, 131072,
                 "https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json: num_hidden_layers 80, "
                 "num_attention_heads 64, num_key_value_heads 8, hidden_size 8192 (head_dim 128), "
                 "intermediate_size 28672, vocab_size 128256, max_position_embeddings 131072, torch_dtype "
                 "bfloat16, untied; 70,553,706,496 parameters (model card: 70.6B).",
                 "GQA group 8. 141 GB of bf16 weights: of the GPU presets only h200 holds them, with about "
                 "9 GB to spare."),
      make_model("qwen2.5-7b-instruct-1m", {28, 28, 4, 128, 3584, 18944, 152064, false, true}, DType::kBf16,
                 1010000,
                 "https://huggingface.co/Qwen/Qwen2.5-7B-Instruct-1M/blob/main/config.json: num_hidden_layers 28, "
                 "num_attention_heads 28, num_key_value_heads 4, hidden_size 3584 (head_dim 128), "
                 "intermediate_size 18944, vocab_size 152064, max_position_embeddings 1010000, torch_dtype "
                 "bfloat16, untied, q/k/v biases (Qwen2); 7,615,616,512 parameters (model card: 7.61B).",
                 std::string("1M context via Dual Chunk Attention (original_max_position_embeddings 262144). "
                             "GQA group 7:") + kGpuGroups),
      make_model("qwen2.5-14b-instruct-1m", {48, 40, 8, 128, 5120, 13824, 152064, false, true}, DType::kBf16,
                 1010000,
                 "https://huggingface.co/Qwen/Qwen2.5-14B-Instruct-1M/blob/main/config.json: num_hidden_layers 48, "
                 "num_attention_heads 40, num_key_value_heads 8, hidden_size 5120 (head_dim 128), "
                 "intermediate_size 13824, vocab_size 152064, max_position_embeddings 1010000, torch_dtype "
                 "bfloat16, untied, q/k/v biases (Qwen2); 14,770,033,664 parameters (model card: 14.8B).",
                 std::string("1M context via Dual Chunk Attention (original_max_position_embeddings 262144). "
                             "GQA group 5:") + kGpuGroups),
      make_model("mistral-nemo-12b", {40, 32, 8, 128, 5120, 14336, 131072, false, false}, DType::kBf16, 1024000,
                 "https://huggingface.co/mistralai/Mistral-Nemo-Instruct-2407/blob/main/config.json: "
                 "num_hidden_layers 40, num_attention_heads 32, num_key_value_heads 8, head_dim 128, hidden_size "
                 "5120, intermediate_size 14336, vocab_size 131072, max_position_embeddings 1024000, torch_dtype "
                 "bfloat16, untied; 12,247,782,400 parameters (model card: 12.2B).",
                 "max_position_embeddings says 1024000 but the model card gives a 128K context window. head_dim "
                 "128 is explicit (hidden_size / heads would be 160). GQA group 4."),
      make_model("glm-4-9b-chat-1m", {40, 32, 4, 128, 4096, 13696, 151552, false, true}, DType::kBf16, 1048576,
                 "https://huggingface.co/THUDM/glm-4-9b-chat-1m/blob/main/config.json (chatglm): num_layers 40, "
                 "num_attention_heads 32, multi_query_attention true, multi_query_group_num 4, kv_channels 128, "
                 "hidden_size 4096, ffn_hidden_size 13696, padded_vocab_size 151552, seq_length 1048576, "
                 "torch_dtype bfloat16, add_qkv_bias true, untied; 9,483,857,920 parameters (model card: 9.48B).",
                 "GQA group 8 (4 KV heads; the 128K glm-4-9b-chat has multi_query_group_num 2)."),
  };
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// ---- config.json ----------------------------------------------------------

// The fields of a config.json; errors name the file and the field.
class ConfigFields {
 public:
  ConfigFields(const json& j, std::string file) : j_(j), file_(std::move(file)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }

  Status error(const char* key, std::string_view rule) const {
    return invalid_argument(file_ + ": field '" + key + "' = " + j_[key].dump() + ": " + std::string(rule));
  }
  Status missing(const char* key) const { return invalid_argument(file_ + ": field '" + key + "' is missing"); }

  Result<uint64_t> positive(const char* key) const {
    if (!has(key)) return missing(key);
    const json& v = j_[key];
    if (!v.is_number_unsigned() || v.get<uint64_t>() == 0) return error(key, "must be a positive integer");
    return v.get<uint64_t>();
  }
  Result<uint32_t> positive_u32(const char* key) const {
    KVT_ASSIGN_OR_RETURN(const uint64_t v, positive(key));
    if (v > std::numeric_limits<uint32_t>::max()) return error(key, "must be < 2^32");
    return static_cast<uint32_t>(v);
  }
  Result<bool> flag_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_boolean()) return error(key, "must be true or false");
    return j_[key].get<bool>();
  }
  std::string string_or(const char* key, std::string fallback) const {
    return has(key) && j_[key].is_string() ? j_[key].get<std::string>() : fallback;
  }
  const std::string& file() const { return file_; }

 private:
  const json& j_;
  std::string file_;
};

// torch_dtype (or dtype, as newer transformers write it); bf16 when absent.
Result<DType> read_dtype(const ConfigFields& f, std::string& notes) {
  const char* key = f.has("torch_dtype") ? "torch_dtype" : "dtype";
  if (!f.has(key)) {
    notes += "torch_dtype absent: bf16 assumed. ";
    return DType::kBf16;
  }
  const std::string text = f.string_or(key, "");
  Result<DType> dtype = parse_dtype(text);
  if (text.empty() || !dtype.ok()) return f.error(key, "must be one of bfloat16, float16, float32");
  return dtype;
}

// head_dim when given, else hidden_size / heads, which must then divide evenly.
Result<uint32_t> read_head_dim(const ConfigFields& f, const char* key, uint64_t hidden, uint32_t heads,
                               const char* heads_key) {
  if (f.has(key)) return f.positive_u32(key);
  if (hidden % heads != 0)
    return invalid_argument(f.file() + ": field '" + key + "' is missing and hidden_size=" + std::to_string(hidden) +
                            " is not a multiple of " + heads_key + "=" + std::to_string(heads));
  return static_cast<uint32_t>(hidden / heads);
}

struct ConfigModel {
  DenseArchitecture arch;
  uint64_t max_positions = 0;
};

Result<ConfigModel> read_llama_style(const ConfigFields& f) {
  ConfigModel m;
  DenseArchitecture& a = m.arch;
  KVT_ASSIGN_OR_RETURN(a.layers, f.positive_u32("num_hidden_layers"));
  KVT_ASSIGN_OR_RETURN(a.q_heads, f.positive_u32("num_attention_heads"));
  a.kv_heads = a.q_heads;
  if (f.has("num_key_value_heads")) {
    KVT_ASSIGN_OR_RETURN(a.kv_heads, f.positive_u32("num_key_value_heads"));
  }
  KVT_ASSIGN_OR_RETURN(a.hidden_size, f.positive("hidden_size"));
  KVT_ASSIGN_OR_RETURN(a.head_dim, read_head_dim(f, "head_dim", a.hidden_size, a.q_heads, "num_attention_heads"));
  KVT_ASSIGN_OR_RETURN(a.intermediate_size, f.positive("intermediate_size"));
  KVT_ASSIGN_OR_RETURN(a.vocab_size, f.positive("vocab_size"));
  KVT_ASSIGN_OR_RETURN(m.max_positions, f.positive("max_position_embeddings"));
  KVT_ASSIGN_OR_RETURN(a.tie_word_embeddings, f.flag_or("tie_word_embeddings", false));
  // Qwen2 always has q/k/v biases; Llama-style configs say so in attention_bias.
  KVT_ASSIGN_OR_RETURN(a.qkv_bias, f.flag_or("attention_bias", f.string_or("model_type", "") == "qwen2"));
  return m;
}

Result<ConfigModel> read_chatglm_style(const ConfigFields& f) {
  ConfigModel m;
  DenseArchitecture& a = m.arch;
  KVT_ASSIGN_OR_RETURN(a.layers, f.positive_u32("num_layers"));
  KVT_ASSIGN_OR_RETURN(a.q_heads, f.positive_u32("num_attention_heads"));
  KVT_ASSIGN_OR_RETURN(const bool grouped, f.flag_or("multi_query_attention", false));
  a.kv_heads = a.q_heads;
  if (grouped) {
    KVT_ASSIGN_OR_RETURN(a.kv_heads, f.positive_u32("multi_query_group_num"));
  }
  KVT_ASSIGN_OR_RETURN(a.hidden_size, f.positive("hidden_size"));
  KVT_ASSIGN_OR_RETURN(a.head_dim, read_head_dim(f, "kv_channels", a.hidden_size, a.q_heads, "num_attention_heads"));
  KVT_ASSIGN_OR_RETURN(a.intermediate_size, f.positive("ffn_hidden_size"));
  KVT_ASSIGN_OR_RETURN(a.vocab_size, f.positive("padded_vocab_size"));
  KVT_ASSIGN_OR_RETURN(m.max_positions, f.positive("seq_length"));
  KVT_ASSIGN_OR_RETURN(a.tie_word_embeddings, f.flag_or("tie_word_embeddings", false));
  KVT_ASSIGN_OR_RETURN(a.qkv_bias, f.flag_or("add_qkv_bias", false));
  return m;
}

// The weight estimate counts one MLP per layer; a mixture of experts has many.
Status reject_moe(const json& j, const std::string& file) {
  for (const char* key : {"num_local_experts", "num_experts", "n_routed_experts"}) {
    const auto it = j.find(key);
    if (it != j.end() && it->is_number_unsigned() && it->get<uint64_t>() > 1)
      return unsupported(file + ": field '" + key + "' = " + it->dump() +
                         ": a mixture-of-experts model; kvtier's weight estimate covers dense models only");
  }
  return Status::ok_status();
}

Result<json> read_config(const fs::path& path) {
  std::ifstream in(path);
  if (!in) return not_found("model config '" + path.string() + "': " + std::strerror(errno));
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    return invalid_argument(path.string() + ": not valid JSON: " + e.what());
  }
  if (!j.is_object())
    return invalid_argument(path.string() + ": the top level must be a JSON object, not " + j.type_name());
  return j;
}

// _name_or_path when the config has one, else the folder holding config.json.
std::string config_model_name(const json& j, const fs::path& path) {
  if (const auto it = j.find("_name_or_path"); it != j.end() && it->is_string() && !it->get<std::string>().empty())
    return it->get<std::string>();
  const std::string folder = path.parent_path().filename().string();
  return folder.empty() || folder == "." ? path.stem().string() : folder;
}

}  // namespace

uint64_t estimate_parameters(const DenseArchitecture& a) {
  const uint64_t h = a.hidden_size;
  const uint64_t qkv_width = (uint64_t{a.q_heads} + 2ULL * a.kv_heads) * a.head_dim;
  const uint64_t per_layer = h * qkv_width + (a.qkv_bias ? qkv_width : 0) + uint64_t{a.q_heads} * a.head_dim * h +
                             3 * h * a.intermediate_size + 2 * h;
  const uint64_t embeddings = a.vocab_size * h;
  return a.layers * per_layer + embeddings + (a.tie_word_embeddings ? 0 : embeddings) + h;
}

std::span<const ModelPreset> model_presets() {
  static const std::vector<ModelPreset> presets = make_presets();
  return presets;
}

Result<ModelPreset> find_model(std::string_view name) {
  std::string known;
  for (const ModelPreset& m : model_presets()) {
    if (lower(m.name) == lower(name)) return m;
    known += (known.empty() ? "" : ", ") + m.name;
  }
  return not_found("unknown model '" + std::string(name) + "'; known models: " + known +
                   " (or load a Hugging Face config.json)");
}

Result<ModelPreset> load_model_config(const fs::path& path) {
  KVT_ASSIGN_OR_RETURN(const json j, read_config(path));
  const ConfigFields f(j, path.string());
  // GLM's remote-code config is "chatglm" and names its fields differently.
  const bool chatglm =
      f.string_or("model_type", "") == "chatglm" || (!f.has("num_hidden_layers") && f.has("num_layers"));
  KVT_RETURN_IF_ERROR(reject_moe(j, path.string()));
  KVT_ASSIGN_OR_RETURN(const ConfigModel m, chatglm ? read_chatglm_style(f) : read_llama_style(f));
  std::string notes;
  KVT_ASSIGN_OR_RETURN(const DType dtype, read_dtype(f, notes));
  if (m.arch.q_heads % m.arch.kv_heads == 0)
    notes += "GQA group " + std::to_string(m.arch.q_heads / m.arch.kv_heads) + ".";
  std::string source = "Hugging Face config.json " + path.string() + (chatglm ? " (chatglm fields)" : "") +
                       "; parameters estimated by estimate_parameters() (dense decoder, gated MLP)";
  return make_model(config_model_name(j, path), m.arch, dtype, m.max_positions, std::move(source), std::move(notes));
}

Status validate(const ModelPreset& model) {
  const Status s = kvtier::validate(model.shape);
  return s.ok() ? s : s.with_context("model '" + model.name + "'");
}

}  // namespace kvtier::runtime

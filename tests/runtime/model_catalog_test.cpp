#include <doctest/doctest.h>

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "kvtier/runtime/model_catalog.h"
#include "temp_dir.h"

using namespace kvtier;
using namespace kvtier::runtime;
using nlohmann::json;

namespace {

namespace fs = std::filesystem;

using test::TempDir;

ModelPreset preset(std::string_view name) {
  Result<ModelPreset> m = find_model(name);
  INFO(m.status().to_string());
  REQUIRE(m.ok());
  return std::move(m).value();
}

// Llama-3.1-8B's config.json, as published (fields kvtier reads, plus a few it ignores).
json llama_config() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false,
    "torch_dtype": "bfloat16", "vocab_size": 128256,
    "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}})");
}

// glm-4-9b-chat-1m's config.json (chatglm field names).
json glm_config() {
  return json::parse(R"({
    "model_type": "chatglm", "add_bias_linear": false, "add_qkv_bias": true, "ffn_hidden_size": 13696,
    "hidden_size": 4096, "kv_channels": 128, "multi_query_attention": true, "multi_query_group_num": 4,
    "num_attention_heads": 32, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 1048576,
    "rmsnorm": true, "rope_ratio": 10000, "torch_dtype": "bfloat16", "tie_word_embeddings": false})");
}

// Qwen2.5-7B-Instruct-1M's config.json: no attention_bias key, yet Qwen2 has q/k/v biases.
json qwen_config() {
  return json::parse(R"({
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 1010000, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rope_theta": 10000000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 152064})");
}

Result<ModelPreset> load(const TempDir& dir, const json& config, const std::string& name = "model/config.json") {
  return load_model_config(dir.write(name, config.dump(2)));
}

std::string load_error(const TempDir& dir, const std::string& text) {
  const Result<ModelPreset> m = load_model_config(dir.write("bad/config.json", text));
  REQUIRE(!m.ok());
  return m.status().message();
}

}  // namespace

TEST_CASE("model presets carry their published shapes, sizes and sources") {
  struct Expected {
    const char* name;
    ModelShape shape;
    uint64_t kv_bytes_per_token;  // layers x kv_heads x head_dim x 2 (K, V) x 2 B
    uint64_t max_positions;
    uint64_t parameters;  // the model cards' counts
  };
  const Expected expected[] = {
      {"llama-3.1-8b", {32, 32, 8, 128, DType::kBf16}, 32 * 8 * 128 * 2 * 2, 131072, 8'030'261'248},
      {"llama-3.1-70b", {80, 64, 8, 128, DType::kBf16}, 80 * 8 * 128 * 2 * 2, 131072, 70'553'706'496},
      {"qwen2.5-7b-instruct-1m", {28, 28, 4, 128, DType::kBf16}, 28 * 4 * 128 * 2 * 2, 1010000, 7'615'616'512},
      {"qwen2.5-14b-instruct-1m", {48, 40, 8, 128, DType::kBf16}, 48 * 8 * 128 * 2 * 2, 1010000, 14'770'033'664},
      {"mistral-nemo-12b", {40, 32, 8, 128, DType::kBf16}, 40 * 8 * 128 * 2 * 2, 1024000, 12'247'782'400},
      {"glm-4-9b-chat-1m", {40, 32, 4, 128, DType::kBf16}, 40 * 4 * 128 * 2 * 2, 1048576, 9'483'857'920},
  };
  REQUIRE(model_presets().size() == std::size(expected));
  for (size_t i = 0; i < std::size(expected); ++i) {
    const Expected& e = expected[i];
    const ModelPreset& m = model_presets()[i];
    CAPTURE(e.name);
    CHECK(m.name == e.name);
    CHECK(m.shape == e.shape);
    CHECK(m.shape.kv_bytes_per_token() == e.kv_bytes_per_token);
    CHECK(m.max_positions == e.max_positions);
    CHECK(m.parameters == e.parameters);
    CHECK(m.weights_bytes == 2 * e.parameters);
    CHECK(m.source.find("https://huggingface.co/") == 0);
    CHECK(!m.notes.empty());
    // Every preset's attention shape passes core's validate() today; the GQA
    // groups 7 and 5 of the Qwen presets are a GPU-kernel limitation (notes).
    CHECK(validate(m).ok());
  }
  CHECK(preset("llama-3.1-8b").shape == llama31_8b_shape());
  CHECK(preset("llama-3.1-8b").shape.kv_bytes_per_token() == 131072);  // DESIGN.md section 1: 128 KiB
  CHECK(preset("qwen2.5-7b-instruct-1m").shape.group_size() == 7);
  CHECK(preset("qwen2.5-7b-instruct-1m").notes.find("GQA group 7") != std::string::npos);
  CHECK(preset("qwen2.5-14b-instruct-1m").notes.find("GQA group 5") != std::string::npos);
}

TEST_CASE("find_model is case-insensitive and lists the known names for an unknown one") {
  CHECK(preset("Llama-3.1-8B").name == "llama-3.1-8b");
  const Result<ModelPreset> m = find_model("llama-3-8b");
  REQUIRE(!m.ok());
  CHECK(m.status().code() == StatusCode::kNotFound);
  CHECK(m.status().message().find("'llama-3-8b'") != std::string::npos);
  for (const ModelPreset& p : model_presets()) CHECK(m.status().message().find(p.name) != std::string::npos);
}

TEST_CASE("estimate_parameters follows its documented formula") {
  // 1 layer, 2 q heads, 1 KV head, head_dim 2, hidden 4, MLP 3, vocab 5:
  // q,k,v 4 x (2 + 2) x 2 = 32; o 2 x 2 x 4 = 16; MLP 3 x 4 x 3 = 36; norms 8
  // -> 92 per layer; embeddings 20, LM head 20, final norm 4.
  DenseArchitecture a{1, 2, 1, 2, 4, 3, 5, false, false};
  CHECK(estimate_parameters(a) == 92 + 20 + 20 + 4);
  a.tie_word_embeddings = true;
  CHECK(estimate_parameters(a) == 92 + 20 + 4);
  a.qkv_bias = true;
  CHECK(estimate_parameters(a) == 92 + 8 + 20 + 4);
}

TEST_CASE("a Llama-style config.json") {
  const TempDir dir("kvtier-model-catalog-test");
  SUBCASE("matches the preset and is named after its folder") {
    const Result<ModelPreset> m = load(dir, llama_config(), "Llama-3.1-8B/config.json");
    INFO(m.status().to_string());
    REQUIRE(m.ok());
    const ModelPreset& p = preset("llama-3.1-8b");
    CHECK(m->name == "Llama-3.1-8B");
    CHECK(m->shape == p.shape);
    CHECK(m->max_positions == p.max_positions);
    CHECK(m->parameters == p.parameters);
    CHECK(m->weights_bytes == p.weights_bytes);
    CHECK(m->source.find("Llama-3.1-8B/config.json") != std::string::npos);
    CHECK(validate(*m).ok());
  }
  SUBCASE("_name_or_path names it when present") {
    json c = llama_config();
    c["_name_or_path"] = "meta-llama/Llama-3.1-8B";
    CHECK(load(dir, c)->name == "meta-llama/Llama-3.1-8B");
  }
  SUBCASE("defaults: KV heads = q heads, head_dim = hidden / heads, tied embeddings honoured") {
    json c = llama_config();
    c.erase("num_key_value_heads");
    c["head_dim"] = nullptr;
    c["tie_word_embeddings"] = true;
    const Result<ModelPreset> m = load(dir, c);
    REQUIRE(m.ok());
    CHECK(m->shape.kv_heads == 32);
    CHECK(m->shape.head_dim == 128);
    // Untying adds the 128256 x 4096 LM head; full K/V heads add 2 x 24 x 128 x 4096 per layer.
    CHECK(preset("llama-3.1-8b").parameters - 128256ULL * 4096 + 32ULL * 2 * 24 * 128 * 4096 == m->parameters);
  }
  SUBCASE("an explicit head_dim wins (Mistral-Nemo: 5120 / 32 would be 160)") {
    json c = llama_config();
    c["hidden_size"] = 5120;
    c["head_dim"] = 128;
    CHECK(load(dir, c)->shape.head_dim == 128);
  }
  SUBCASE("torch_dtype float32 loads, and validate() says f32 K/V is unsupported") {
    json c = llama_config();
    c["torch_dtype"] = "float32";
    const Result<ModelPreset> m = load(dir, c, "llama-fp32/config.json");
    REQUIRE(m.ok());
    CHECK(m->shape.dtype == DType::kF32);
    CHECK(m->weights_bytes == 4 * m->parameters);
    const Status s = validate(*m);
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK(s.message().find("model 'llama-fp32'") != std::string::npos);
    CHECK(s.message().find("dtype=f32 is unsupported") != std::string::npos);
  }
  SUBCASE("an absent torch_dtype means bf16, and says so") {
    json c = llama_config();
    c.erase("torch_dtype");
    const Result<ModelPreset> m = load(dir, c);
    REQUIRE(m.ok());
    CHECK(m->shape.dtype == DType::kBf16);
    CHECK(m->notes.find("torch_dtype absent") != std::string::npos);
  }
  SUBCASE("an unsupported head_dim is reported by validate(), naming the model") {
    json c = llama_config();
    c["head_dim"] = 96;
    const Result<ModelPreset> m = load(dir, c, "odd/config.json");
    REQUIRE(m.ok());
    CHECK(validate(*m).message().find("model 'odd': model shape: head_dim=96 is unsupported") != std::string::npos);
  }
}

TEST_CASE("a Qwen2 config.json counts its q/k/v biases") {
  const TempDir dir("kvtier-model-catalog-test");
  const Result<ModelPreset> m = load(dir, qwen_config());
  REQUIRE(m.ok());
  const ModelPreset& p = preset("qwen2.5-7b-instruct-1m");
  CHECK(m->shape == p.shape);
  CHECK(m->parameters == p.parameters);
  CHECK(m->max_positions == 1010000);
  CHECK(m->notes.find("GQA group 7") != std::string::npos);
}

TEST_CASE("a GLM (chatglm) config.json") {
  const TempDir dir("kvtier-model-catalog-test");
  const Result<ModelPreset> m = load(dir, glm_config(), "glm-4-9b-chat-1m/config.json");
  INFO(m.status().to_string());
  REQUIRE(m.ok());
  const ModelPreset& p = preset("glm-4-9b-chat-1m");
  CHECK(m->name == "glm-4-9b-chat-1m");
  CHECK(m->shape == p.shape);
  CHECK(m->max_positions == 1048576);
  CHECK(m->parameters == p.parameters);
  CHECK(m->source.find("chatglm") != std::string::npos);

  SUBCASE("without multi_query_attention every q head has its own K/V") {
    json c = glm_config();
    c["multi_query_attention"] = false;
    CHECK(load(dir, c)->shape.kv_heads == 32);
  }
  SUBCASE("recognised by its field names even without model_type") {
    json c = glm_config();
    c.erase("model_type");
    CHECK(load(dir, c)->shape == p.shape);
  }
  SUBCASE("a missing chatglm field is named") {
    json c = glm_config();
    c.erase("seq_length");
    const Result<ModelPreset> bad = load(dir, c);
    REQUIRE(!bad.ok());
    CHECK(bad.status().message().find("field 'seq_length' is missing") != std::string::npos);
  }
  SUBCASE("multi_query_attention without its group count") {
    json c = glm_config();
    c.erase("multi_query_group_num");
    CHECK(load(dir, c).status().message().find("field 'multi_query_group_num' is missing") != std::string::npos);
  }
}

TEST_CASE("bad config files name the file and the field") {
  const TempDir dir("kvtier-model-catalog-test");
  const fs::path missing = "/nonexistent/kvtier/config.json";
  const Result<ModelPreset> none = load_model_config(missing);
  REQUIRE(!none.ok());
  CHECK(none.status().code() == StatusCode::kNotFound);
  CHECK(none.status().message().find(missing.string()) != std::string::npos);

  const std::string not_json = load_error(dir, "{\"num_hidden_layers\": 32,");
  CHECK(not_json.find("bad/config.json: not valid JSON") != std::string::npos);
  CHECK(load_error(dir, "[1, 2]").find("bad/config.json: the top level must be a JSON object, not array") !=
        std::string::npos);

  auto error_with = [&](const char* key, const json& value) {
    json c = llama_config();
    if (value.is_discarded()) c.erase(key);
    else c[key] = value;
    return load_error(dir, c.dump());
  };
  const json erase(json::value_t::discarded);
  CHECK(error_with("num_attention_heads", erase).find("bad/config.json: field 'num_attention_heads' is missing") !=
        std::string::npos);
  CHECK(error_with("num_hidden_layers", "32").find("field 'num_hidden_layers' = \"32\": must be a positive integer") !=
        std::string::npos);
  CHECK(error_with("num_hidden_layers", 0).find("field 'num_hidden_layers' = 0: must be a positive integer") !=
        std::string::npos);
  CHECK(error_with("num_key_value_heads", -8).find("field 'num_key_value_heads' = -8: must be a positive integer") !=
        std::string::npos);
  CHECK(error_with("hidden_size", 40.5).find("field 'hidden_size' = 40.5: must be a positive integer") !=
        std::string::npos);
  CHECK(error_with("max_position_embeddings", erase).find("field 'max_position_embeddings' is missing") !=
        std::string::npos);
  CHECK(error_with("torch_dtype", "int8").find("field 'torch_dtype' = \"int8\": must be one of bfloat16") !=
        std::string::npos);
  CHECK(error_with("tie_word_embeddings", "yes").find("field 'tie_word_embeddings' = \"yes\": must be true or false") !=
        std::string::npos);
  CHECK(error_with("num_attention_heads", 48).find("field 'head_dim' is missing and hidden_size=4096 is not a multiple "
                                                   "of num_attention_heads=48") != std::string::npos);

  json moe = llama_config();
  moe["num_local_experts"] = 8;
  const Result<ModelPreset> m = load_model_config(dir.write("moe/config.json", moe.dump()));
  REQUIRE(!m.ok());
  CHECK(m.status().code() == StatusCode::kUnsupported);
  CHECK(m.status().message().find("mixture-of-experts") != std::string::npos);
}

// llm_bench: greedy decoding speed of a GGUF file in llama.cpp (benchmarks/serving_latency.py runs it).
//
//   llm_bench -m model.gguf --tokens 1,5,9;7,2,4 --new-tokens N [-t threads]
//   -> {"prefill_seconds": x, "seconds": y, "generated": [[...] per prompt]}
// The prompts (';' between them, of equal length) run side by side, one llama.cpp sequence each and one
// llama_decode per step for all of them; each gets N new tokens, no early stop. After a warm-up generation the
// prefill alone is timed, then the whole generation (prefill included). f32 KV cache, as llm_logits.
#include <chrono>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm.h"

using Prompts = std::vector<std::vector<llama_token>>;

static double seconds_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// All prompts at once, then `new_tokens` steps of one token per prompt; the greedy tokens per prompt.
static Prompts generate(llm::Model & model, const Prompts & prompts, int new_tokens) {
    llama_memory_clear(llama_get_memory(model.ctx), true);
    const int n = (int) prompts.size(), length = (int) prompts[0].size();
    llama_batch batch = llama_batch_init(n * length, 0, 1);
    Prompts generated(n);
    std::vector<int> last(n);  // each sequence's last token in the batch: where its logits are
    for (int step = 0; step < new_tokens; ++step) {
        batch.n_tokens = 0;
        for (int s = 0; s < n; ++s) {
            const std::vector<llama_token> feed = step == 0 ? prompts[s] : std::vector<llama_token>{generated[s].back()};
            for (size_t i = 0; i < feed.size(); ++i) {
                int k = batch.n_tokens++;
                batch.token[k] = feed[i];
                batch.pos[k] = (step == 0 ? 0 : length + step - 1) + (llama_pos) i;
                batch.n_seq_id[k] = 1;
                batch.seq_id[k][0] = s;
                batch.logits[k] = i + 1 == feed.size();
                last[s] = k;
            }
        }
        if (llama_decode(model.ctx, batch) != 0) {
            llama_batch_free(batch);
            throw std::runtime_error("llama_decode failed");
        }
        for (int s = 0; s < n; ++s) {
            generated[s].push_back(model.argmax(last[s]));
        }
    }
    llama_batch_free(batch);
    return generated;
}

int main(int argc, char ** argv) {
    try {
        auto given = llm::options(argc, argv, {"-m", "--tokens", "--new-tokens", "-t"});
        std::string model_path = given["-m"];
        int new_tokens = given.count("--new-tokens") ? std::stoi(given["--new-tokens"]) : 16;
        int threads = given.count("-t") ? std::stoi(given["-t"]) : 2;
        Prompts prompts;
        std::stringstream sequences(given["--tokens"]);
        for (std::string sequence; std::getline(sequences, sequence, ';');) {
            std::stringstream ids(sequence);
            prompts.emplace_back();
            for (std::string id; std::getline(ids, id, ',');) {
                prompts.back().push_back(std::stoi(id));
            }
            if (prompts.back().size() != prompts[0].size() || prompts.back().empty()) {
                throw std::invalid_argument("the prompts must be non-empty and of one length");
            }
        }
        if (model_path.empty() || prompts.empty() || new_tokens < 1) {
            throw std::invalid_argument("usage: llm_bench -m MODEL.gguf --tokens 1,2,3[;4,5,6...] --new-tokens N [-t T]");
        }
        llm::quiet_logs();
        const int n = (int) prompts.size(), per_sequence = (int) prompts[0].size() + new_tokens + 1;
        llm::Model model(model_path, n * per_sequence, threads, /*f32_cache=*/true, /*n_seq_max=*/n);
        generate(model, prompts, new_tokens);  // warm-up
        auto start = std::chrono::steady_clock::now();
        generate(model, prompts, 1);  // the prefill (and its one token)
        double prefill = seconds_since(start);
        start = std::chrono::steady_clock::now();
        Prompts generated = generate(model, prompts, new_tokens);
        double seconds = seconds_since(start);
        printf("{\"prefill_seconds\": %.6f, \"seconds\": %.6f, \"generated\": [", prefill, seconds);
        for (int s = 0; s < n; ++s) {
            printf("%s[", s ? ", " : "");
            for (size_t i = 0; i < generated[s].size(); ++i) {
                printf("%s%d", i ? ", " : "", generated[s][i]);
            }
            printf("]");
        }
        printf("]}\n");
    } catch (const std::exception & error) {
        fprintf(stderr, "error: %s\n", error.what());
        return 1;
    }
    return 0;
}

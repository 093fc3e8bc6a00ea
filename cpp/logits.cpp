// llm_logits: what llama.cpp computes for given tokens, as JSON on stdout (the export checks compare it with
// transformers; see tests/export/test_llamacpp.py).
//
//   llm_logits -m model.gguf --tokens 1,5,9 [--generate N]   # {"logits": [[...] per position], "generated": [...]}
//   llm_logits -m model.gguf --tokenize TEXT                  # {"tokens": [...]} (no BOS/EOS, special text matched)
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm.h"

int main(int argc, char ** argv) {
    try {
        auto given = llm::options(argc, argv, {"-m", "--tokens", "--tokenize", "--generate", "-t"});
        bool tokenize = given.count("--tokenize") > 0;  // before operator[] adds the key
        std::string model_path = given["-m"], tokens_arg = given["--tokens"], text = given["--tokenize"];
        int generate = given.count("--generate") ? std::stoi(given["--generate"]) : 0;
        int threads = given.count("-t") ? std::stoi(given["-t"]) : 2;
        if (model_path.empty() || (tokens_arg.empty() && !tokenize)) {
            throw std::invalid_argument("usage: llm_logits -m MODEL.gguf (--tokens 1,2,3 [--generate N] | --tokenize TEXT)");
        }
        llm::quiet_logs();
        std::vector<llama_token> tokens;
        std::stringstream list(tokens_arg);
        for (std::string item; std::getline(list, item, ',');) {
            tokens.push_back(std::stoi(item));
        }
        llm::Model model(model_path, (int) tokens.size() + generate + 1, threads, /*f32_cache=*/true);
        if (tokenize) {
            int n = -llama_tokenize(model.vocab, text.data(), (int32_t) text.size(), nullptr, 0, false, true);
            std::vector<llama_token> ids(n);
            llama_tokenize(model.vocab, text.data(), (int32_t) text.size(), ids.data(), n, false, true);
            printf("{\"tokens\": [");
            for (int i = 0; i < n; ++i) {
                printf("%s%d", i ? ", " : "", ids[i]);
            }
            printf("]}\n");
            return 0;
        }
        model.decode(tokens, 0, true);
        int n_vocab = llama_vocab_n_tokens(model.vocab);
        printf("{\"logits\": [");
        for (size_t i = 0; i < tokens.size(); ++i) {
            const float * row = llama_get_logits_ith(model.ctx, (int32_t) i);
            printf("%s[", i ? ", " : "");
            for (int j = 0; j < n_vocab; ++j) {
                printf("%s%.9g", j ? ", " : "", row[j]);
            }
            printf("]");
        }
        printf("], \"generated\": [");
        int position = (int) tokens.size();
        for (int step = 0; step < generate; ++step) {
            llama_token next = model.argmax(step == 0 ? (int32_t) tokens.size() - 1 : -1);
            printf("%s%d", step ? ", " : "", next);
            if (step + 1 < generate) {
                model.decode({next}, position++, false);
            }
        }
        printf("]}\n");
    } catch (const std::exception & error) {
        fprintf(stderr, "error: %s\n", error.what());
        return 1;
    }
    return 0;
}

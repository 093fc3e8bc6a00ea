// llm_chat: chat with a GGUF model (written by `export.py --format gguf`) on llama.cpp, greedy decoding.
//
//   llm_chat -m model-f16.gguf                     # type a question per line; /reset forgets the history
//   llm_chat -m model-f16.gguf --single-turn < questions.txt   # one answer per line, no history
//
// The prompt is built token for token as component/data/template.py builds it (human_assistant or
// baichuan_chat: the GGUF's llm_training.template key, or --template), replies stream as they are generated,
// end at the template's stop token / stop string, and are kept in the history as generate.py keeps them.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llm.h"
#include "prompt.h"

namespace {

const char * USAGE =
    "usage: llm_chat -m MODEL.gguf [--template human_assistant|baichuan_chat] [--system TEXT]\n"
    "                [-n MAX_NEW_TOKENS (512)] [-c CONTEXT (model's)] [-t THREADS (2)] [--single-turn]\n"
    "                [--f32-cache]\n"
    "  Interactive: one question per line; '/reset' clears the history; an empty line or EOF quits.\n"
    "  --single-turn: every stdin line is a new conversation; prints one answer per line (newlines as \\n).\n"
    "  --f32-cache: an f32 KV cache without flash attention (default f16: half the memory).\n";

struct Options {
    std::string model, template_name, system;
    int max_new_tokens = 512, n_ctx = 0, threads = 2;
    bool single_turn = false, f32_cache = false;
};

Options parse(int argc, char ** argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                throw std::invalid_argument(arg + " needs a value");
            }
            return argv[++i];
        };
        if (arg == "-m" || arg == "--model") {
            options.model = value();
        } else if (arg == "--template") {
            options.template_name = value();
        } else if (arg == "--system") {
            options.system = value();
        } else if (arg == "-n" || arg == "--max-new-tokens") {
            options.max_new_tokens = std::stoi(value());
        } else if (arg == "-c" || arg == "--ctx") {
            options.n_ctx = std::stoi(value());
        } else if (arg == "-t" || arg == "--threads") {
            options.threads = std::stoi(value());
        } else if (arg == "--single-turn") {
            options.single_turn = true;
        } else if (arg == "--f32-cache") {
            options.f32_cache = true;
        } else {
            throw std::invalid_argument("unknown argument '" + arg + "'");
        }
    }
    if (options.model.empty()) {
        throw std::invalid_argument("-m MODEL.gguf is required");
    }
    return options;
}

// Greedy generation after `prompt`, reusing the KV cache for the prefix it shares with the last call.
class Generator {
  public:
    Generator(llm::Model & model, const llm::Template & tmpl) : model_(model), tmpl_(tmpl) {}

    // Streams visible text to `out` (null: silent) and returns the generated tokens.
    std::vector<llama_token> generate(const std::vector<llama_token> & prompt, int max_new_tokens, FILE * out) {
        int n_ctx = (int) llama_n_ctx(model_.ctx);
        if ((int) prompt.size() >= n_ctx) {
            throw std::runtime_error("the conversation (" + std::to_string(prompt.size()) +
                                     " tokens) fills the context of " + std::to_string(n_ctx) + "; /reset");
        }
        max_new_tokens = std::min(max_new_tokens, n_ctx - (int) prompt.size());
        size_t common = 0;
        while (common < cached_.size() && common < prompt.size() && cached_[common] == prompt[common]) {
            ++common;
        }
        common = std::min(common, prompt.size() - 1);  // the last prompt token is run again for its logits
        llama_memory_seq_rm(llama_get_memory(model_.ctx), 0, (llama_pos) common, -1);
        cached_.assign(prompt.begin(), prompt.end());
        model_.decode(std::vector<llama_token>(prompt.begin() + common, prompt.end()), (int) common, false);

        std::vector<llama_token> generated;
        std::string text;
        size_t shown = 0;
        while ((int) generated.size() < max_new_tokens) {
            llama_token next = model_.argmax();
            generated.push_back(next);
            if (tmpl_.is_stop_token(next)) {
                break;
            }
            text += tmpl_.piece(next);
            if (stops(text)) {
                break;
            }
            if (out) {
                shown = show(text, shown, false, out);
            }
            if ((int) generated.size() == max_new_tokens) {
                break;
            }
            cached_.push_back(next);
            model_.decode({next}, (int) cached_.size() - 1, false);
        }
        if (out) {
            show(text, shown, true, out);
        }
        return generated;
    }

  private:
    bool stops(const std::string & text) const {
        for (const std::string & stop : tmpl_.stop_strings()) {
            if (text.find(stop) != std::string::npos) {
                return true;
            }
        }
        return false;
    }

    // Prints the answer as far as it is certain: leading whitespace skipped, text that may start a stop
    // string held back until the reply ends.
    size_t show(const std::string & text, size_t shown, bool done, FILE * out) const {
        std::string visible = text;
        for (const std::string & stop : tmpl_.stop_strings()) {
            size_t at = visible.find(stop);
            if (at != std::string::npos) {
                visible.resize(at);
            }
        }
        size_t begin = visible.find_first_not_of(" \t\n\r\f\v");
        visible = begin == std::string::npos ? "" : visible.substr(begin);
        if (done) {
            visible = llm::strip(visible);
        } else {
            size_t hold = 0;
            for (const std::string & stop : tmpl_.stop_strings()) {
                hold = std::max(hold, stop.size() - 1);
            }
            visible.resize(visible.size() > hold ? visible.size() - hold : 0);
        }
        if (visible.size() > shown) {
            fwrite(visible.data() + shown, 1, visible.size() - shown, out);
            fflush(out);
            shown = visible.size();
        }
        return shown;
    }

    llm::Model & model_;
    const llm::Template & tmpl_;
    std::vector<llama_token> cached_;
};

std::string escape_newlines(const std::string & text) {
    std::string escaped;
    for (char c : text) {
        if (c == '\\') {
            escaped += "\\\\";
        } else if (c == '\n') {
            escaped += "\\n";
        } else {
            escaped += c;
        }
    }
    return escaped;
}

}  // namespace

int main(int argc, char ** argv) {
    Options options;
    try {
        options = parse(argc, argv);
    } catch (const std::exception & error) {
        fprintf(stderr, "error: %s\n%s", error.what(), USAGE);
        return 2;
    }
    try {
        llm::quiet_logs();
        llm::Model model(options.model, options.n_ctx, options.threads, options.f32_cache);
        std::string name = options.template_name;
        if (name.empty()) {
            name = model.meta("llm_training.template");
        }
        llm::Template tmpl(name.empty() ? "human_assistant" : name, model.vocab);
        Generator generator(model, tmpl);
        std::vector<llm::Turn> history;
        bool interactive = !options.single_turn;
        std::string line;
        while (true) {
            if (interactive) {
                fputs("Human: ", stdout);
                fflush(stdout);
            }
            if (!std::getline(std::cin, line) || (interactive && line.empty())) {
                break;
            }
            if (interactive && line == "/reset") {
                history.clear();
                continue;
            }
            if (options.single_turn) {
                history.clear();
            }
            std::vector<llama_token> prompt = tmpl.encode_prompt(history, line, options.system);
            if (interactive) {
                fputs("Assistant: ", stdout);
            }
            std::vector<llama_token> reply = generator.generate(prompt, options.max_new_tokens, interactive ? stdout : nullptr);
            std::string answer = tmpl.clean_answer(reply);
            if (interactive) {
                fputs("\n", stdout);
            } else {
                printf("%s\n", escape_newlines(answer).c_str());
                fflush(stdout);
            }
            history.push_back({line, answer});
        }
    } catch (const std::exception & error) {
        fprintf(stderr, "error: %s\n", error.what());
        return 1;
    }
    return 0;
}

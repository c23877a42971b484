"""Data for L3M fine-tuning: chat templates, UltraChat, chatterbot-corpus and HH-RLHF
readers, splits, batches per rank, and small demo data with its own tokenizer that stands
in for UltraChat and HH on a CPU ("Demo data" below).

    task = read_ultrachat("ultrachat.jsonl.gz", tok)  # (prompt, response) pairs ≤ 512 tokens
    train, val, test = split_dataset(task.examples, val=1700, test=1700, seed=0)
    stream = Stream(len(train), 8, seed=0, rank=rank, world=world)  # batch_indices in turn
    batch = [train[i] for i in stream.next()]
    tokens, mask, segments = packed_batch([e.prompt for e in batch], [e.response for e in batch])
    demo = prepare_demo("out")                        # tokenizer + JSONL files, built once

Where this departs from the paper, or fixes what it leaves open:
- Chat template (the paper names none): --chat_template (encode_prompt), one for every
  source, policy and reward models alike; "plain" (the demo's, for base models) is
  HH-RLHF's without its leading blank line. A prompt ends where its answer starts, and
  the answer ends with the stop token's *id* (EOS; ChatML's <|im_end|>), not text: an
  exact boundary.
- UltraChat: the assistant turn kept as the response is drawn with a seed keyed by the
  dialogue's text (the same pair in any file, compressed or not, at any line); pairs over
  max_tokens, BOS and EOS included, are dropped, not truncated.
- chatterbot-corpus (real dialogues for a small chat model on a CPU): each YAML
  conversation is read as an UltraChat dialogue; repeated examples are kept once.
- HH-RLHF: a pair is kept when both prompt + y⁺ and prompt + y⁻ fit in max_tokens (App.
  A.1: 2,024; its 161k/9k pairs against HH's published 161k/8.5k say that filter dropped
  almost nothing; the reader reports how many it drops). The test file is HH's own; 5 %
  of train is held out for validation."""
import fcntl
import functools
import gzip
import json
import math
import os
import random
import re
import shutil
from collections import Counter, namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch


class DataError(ValueError):
    """Malformed data: an input line (the parsers raise it with a short reason, the readers
    as file:line: reason), or a tokenizer that cannot write the chat template."""

# --chat_template: the format the model was trained to chat in
TEMPLATES = ("plain", "llama2", "chatml")
_ROLES = ("user", "assistant")  # turn i of a dialogue is _ROLES[i % 2]


def render_dialogue(dialogue: Sequence[tuple]) -> str:
    r"""A dialogue [(role, text), …], roles user/assistant, as text:
    "Human: …\n\nAssistant: …"."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[role]}: {text.strip()}" for role, text in dialogue)


def encode_prompt(tokenizer, dialogue: Sequence[tuple], template: str = "plain",
                  system: str = "") -> np.ndarray:
    r"""Prompt ids (int32) of a dialogue ending with a user turn, in a chat template; they
    end where the answer starts.

    plain   BOS "Human: u₁\n\nAssistant: a₁\n\nHuman: u₂\n\nAssistant:"
    llama2  BOS "[INST] <<SYS>>\n{system}\n<</SYS>>\n\nu₁ [/INST] a₁ " EOS BOS "[INST] u₂ [/INST]"
    chatml  BOS "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nu₁<|im_end|>\n
                 <|im_start|>assistant\na₁<|im_end|>\n<|im_start|>user\nu₂<|im_end|>\n
                 <|im_start|>assistant\n"                                   (one string)

    plain has no system prompt. llama2 is LLaMA-2-chat's format as Meta's chat_completion
    encodes it (BOS and EOS are ids, never text); chatml needs <|im_start|> and <|im_end|>
    as added tokens (model.Tokenizer). No system prompt, no system block."""
    if not dialogue or dialogue[-1][0] != "user":
        raise ValueError("a prompt dialogue must end with a user turn")

    if template == "plain":
        if system:
            raise ValueError("the plain template has no system prompt")
        text = render_dialogue(dialogue) + "\n\nAssistant:"
        return np.asarray(tokenizer.encode(text, bos=True), dtype=np.int32)

    if template == "chatml":
        turns = list(dialogue)
        if system:
            turns = [("system", system)] + turns
        text = "".join(f"<|im_start|>{role}\n{said.strip()}<|im_end|>\n" for role, said in turns)
        text += "<|im_start|>assistant\n"
        return np.asarray(_chatml(tokenizer).encode(text), dtype=np.int32)

    # llama2: each earlier exchange is encoded on its own, BOS first and EOS last
    turns = [text.strip() for _, text in dialogue]
    if system:
        turns[0] = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{turns[0]}"
    ids = []
    for user, answer in zip(turns[:-1:2], turns[1::2]):
        ids += tokenizer.encode(f"[INST] {user} [/INST] {answer} ", eos=True)
    ids += tokenizer.encode(f"[INST] {turns[-1]} [/INST]")
    return np.asarray(ids, dtype=np.int32)


def encode_response(tokenizer, text: str, template: str = "plain") -> np.ndarray:
    r"""Answer ids (int32), the template's stop token last, such that prompt + answer are
    the ids of the whole exchange. plain, llama2: the space after "Assistant:"/"[/INST]" is
    the one sentencepiece puts before an answer tokenised alone (llama2 also keeps one
    before EOS); chatml: no space, so it is tokenised after "assistant\n", which is cut
    off."""
    if template != "chatml":
        answer = text.strip()
        if template == "llama2":
            answer += " "
        return np.asarray(tokenizer.encode(answer, bos=False, eos=True), np.int32)

    head = _chatml(tokenizer).encode("assistant\n", bos=False)
    ids = _chatml(tokenizer).encode("assistant\n" + text.strip(), bos=False)
    if ids[:len(head)] != head:
        raise ValueError(f"{text!r}: the tokenizer merges it with the 'assistant\\n' before it")
    return np.asarray(ids[len(head):] + [stop_id(tokenizer, template)], dtype=np.int32)


def stop_id(tokenizer, template: str) -> int:
    """The token that ends an answer: EOS, or ChatML's <|im_end|>."""
    if template == "chatml":
        return _chatml(tokenizer).added["<|im_end|>"]
    return tokenizer.eos_id


def _chatml(tokenizer):
    """The tokenizer, once it is known to have ChatML's markers as added tokens."""
    if not {"<|im_start|>", "<|im_end|>"} <= getattr(tokenizer, "added", {}).keys():
        raise DataError("--chat_template=chatml needs <|im_start|> and <|im_end|> among the "
                        "tokenizer's added tokens (added_tokens.json beside tokenizer.model, "
                        "or special tokens of a tokenizer.json; `python model.py convert` "
                        "copies them)")
    return tokenizer


def _check_template(tokenizer, template: str):
    """Fail once, before reading, if the tokenizer cannot write the template: a reader
    would otherwise count its DataError as one malformed line for every line."""
    if template == "chatml":
        _chatml(tokenizer)

# int32 token-id arrays: the prompt (P,), BOS first; the response, and HH's chosen y⁺ and
# rejected y⁻, EOS last
TaskExample = namedtuple("TaskExample", ["prompt", "response"])
PreferenceExample = namedtuple("PreferenceExample", ["prompt", "chosen", "rejected"])


@dataclass
class ReadResult:
    """What a reader kept, and an account of what it did not."""
    source: str
    max_tokens: int
    examples: list = field(default_factory=list)
    lines: int = 0
    too_long: int = 0
    malformed: Counter = field(default_factory=Counter)  # reason -> number of lines
    repeats: int = 0  # examples equal to one kept before (read_chatterbot)

    def __str__(self):
        text = (f"{self.source}: kept {len(self.examples)} of {self.lines} lines, "
                f"dropped {self.too_long} over {self.max_tokens} tokens")
        if self.repeats:
            text += f", {self.repeats} repeats of kept examples"
        text += f", skipped {self.malformed.total()} malformed"
        why = "; ".join(f"{n} {reason}" for reason, n in self.malformed.most_common())
        if why:
            text += f" ({why})"
        return text


def _read(records, parse, result: ReadResult, strict: bool) -> ReadResult:
    """parse(record) -> (prompt, response, …) for every (where, record) of `records`, into
    result. A record that is a DataError is malformed already; where is "file:line"."""
    for where, record in records:
        result.lines += 1
        try:
            if isinstance(record, DataError):
                raise record
            example = parse(record)
        except DataError as e:
            if strict:
                raise DataError(f"{where}: {e}") from None
            result.malformed[str(e)] += 1
            continue

        longest = max(map(len, example[1:]))  # the response, or the longer of y⁺ and y⁻
        if len(example.prompt) + longest > result.max_tokens:
            result.too_long += 1
        else:
            result.examples.append(example)
    return result


def _paths(paths) -> list:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def _jsonl_records(paths):
    """(file:line, JSON object or DataError) for every line of the JSONL files, gzipped if
    named .gz."""
    for path in paths:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = DataError("not JSON")
                if not isinstance(record, (dict, DataError)):
                    record = DataError("not a JSON object")
                yield f"{path}:{lineno}", record


def _text(turn) -> str:
    if not isinstance(turn, str):
        raise DataError("a turn is not a string")
    if not turn.strip():
        raise DataError("empty turn")
    return turn


def _ultrachat_dialogue(record: dict) -> list:
    """[(role, text), …] from either public UltraChat format: {"id", "data": [user,
    assistant, …]} or {"messages": [{"role", "content"}, …]}. Roles must alternate,
    starting with the user."""
    if "data" in record:
        if not isinstance(record["data"], list):
            raise DataError("'data' is not a list")
        dialogue = [(_ROLES[i % 2], _text(t)) for i, t in enumerate(record["data"])]
    elif "messages" in record:
        turns = record["messages"]
        if not (isinstance(turns, list)
                and all(isinstance(t, dict) and "role" in t and "content" in t for t in turns)):
            raise DataError("'messages' is not a list of {role, content}")
        dialogue = [(t["role"], _text(t["content"])) for t in turns]
        if any(role != _ROLES[i % 2] for i, (role, _) in enumerate(dialogue)):
            raise DataError("roles do not alternate user, assistant, … starting with user")
    else:
        raise DataError("neither 'data' nor 'messages'")

    if len(dialogue) < 2:
        raise DataError("no assistant turn")
    return dialogue


def read_ultrachat(paths, tokenizer, *, max_tokens: int = 512, seed: int = 0, strict: bool = False,
                   template: str = "plain", system: str = "") -> ReadResult:
    """UltraChat JSONL (or .jsonl.gz) -> ReadResult of TaskExamples: an assistant turn
    drawn with (seed, the dialogue's text) is the response, the dialogue before it the
    prompt (App. A). strict=True: DataError at a malformed line."""
    _check_template(tokenizer, template)
    parse = functools.partial(_ultrachat_example, tokenizer=tokenizer, seed=seed,
                              template=template, system=system)
    paths = _paths(paths)
    result = ReadResult(", ".join(map(str, paths)), max_tokens)
    return _read(_jsonl_records(paths), parse, result, strict)


def _ultrachat_example(record: dict, tokenizer, seed: int, template: str,
                       system: str) -> TaskExample:
    dialogue = _ultrachat_dialogue(record)
    rng = random.Random(f"{seed}:{json.dumps(dialogue)}")
    k = rng.randrange(1, len(dialogue), 2)  # an assistant turn
    prompt = encode_prompt(tokenizer, dialogue[:k], template, system)
    return TaskExample(prompt, encode_response(tokenizer, dialogue[k][1], template))


def read_chatterbot(paths, tokenizer, *, max_tokens: int = 512, seed: int = 0, strict: bool = False,
                    template: str = "plain", system: str = "") -> ReadResult:
    """chatterbot-corpus YAML files ({categories, conversations: [[user, assistant, user,
    …], …]}), or folders of them, -> ReadResult of TaskExamples, each conversation read as
    one UltraChat dialogue (read_ultrachat). An example equal to one kept before is dropped
    (the corpus repeats its tech-support answers 105 times each), so that no test answer is
    also a training answer. Needs PyYAML."""
    _check_template(tokenizer, template)
    paths = _paths(paths)
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.yml"))
        else:
            files.append(path)

    parse = functools.partial(_ultrachat_example, tokenizer=tokenizer, seed=seed,
                              template=template, system=system)
    result = ReadResult(", ".join(map(str, paths)), max_tokens)
    _read(_chatterbot_records(files), parse, result, strict)

    seen, unique = set(), []
    for example in result.examples:
        key = (example.prompt.tobytes(), example.response.tobytes())
        if key not in seen:
            seen.add(key)
            unique.append(example)
    result.repeats = len(result.examples) - len(unique)
    result.examples = unique
    return result


def _chatterbot_records(paths):
    """(file:line, {"data": turns} or DataError) for every conversation of
    chatterbot-corpus YAML files."""
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading chatterbot-corpus YAML needs `pip install pyyaml`") from e

    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                root = yaml.compose(f, Loader=yaml.SafeLoader)  # nodes, which know their lines
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                line = mark.line + 1 if mark else 1
                yield f"{path}:{line}", DataError(f"not YAML: {getattr(e, 'problem', e)}")
                continue

        conversations = None
        if isinstance(root, yaml.MappingNode):
            conversations = next((v for k, v in root.value if k.value == "conversations"), None)
        if not isinstance(conversations, yaml.SequenceNode):
            yield f"{path}:1", DataError("no 'conversations' list")
            continue

        for node in conversations.value:
            where = f"{path}:{node.start_mark.line + 1}"
            turns = node.value if isinstance(node, yaml.SequenceNode) else []
            if turns and all(isinstance(t, yaml.ScalarNode) for t in turns):
                yield where, {"data": [t.value for t in turns]}
            else:
                yield where, DataError("a conversation is not a list of turns")


def read_task(paths, tokenizer, **kwargs) -> ReadResult:
    """Task pairs from UltraChat JSONL files, or from chatterbot-corpus YAML files and
    folders, told by their names."""
    is_yaml = [p.is_dir() or p.suffix in (".yml", ".yaml") for p in _paths(paths)]
    if any(is_yaml) and not all(is_yaml):
        raise DataError(f"{', '.join(map(str, paths))}: UltraChat JSONL and chatterbot YAML "
                        "files in one --data")
    if all(is_yaml):
        return read_chatterbot(paths, tokenizer, **kwargs)
    return read_ultrachat(paths, tokenizer, **kwargs)


def _hh_dialogue(text) -> list:
    """[(role, text), …] from HH-RLHF's "\\n\\nHuman: …\\n\\nAssistant: …" string, ending
    with the answer."""
    if not isinstance(text, str):
        raise DataError("'chosen'/'rejected' is not a string")
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + text.lstrip("\n"))
    if parts[0].strip():
        raise DataError("text before the first 'Human:'")

    roles = {"Human": "user", "Assistant": "assistant"}
    dialogue = [(roles[who], said) for who, said in zip(parts[1::2], parts[2::2])]
    if any(role != _ROLES[i % 2] for i, (role, _) in enumerate(dialogue)):
        raise DataError("turns do not alternate Human, Assistant, … starting with Human")
    if len(dialogue) < 2 or dialogue[-1][0] != "assistant":
        raise DataError("does not end with an Assistant turn")
    return [(role, _text(said)) for role, said in dialogue]


def read_hh(paths, tokenizer, *, max_tokens: int = 2024, strict: bool = False,
            template: str = "plain", system: str = "") -> ReadResult:
    """HH-RLHF JSONL {"chosen", "rejected"} -> ReadResult of PreferenceExamples (prompt, y⁺,
    y⁻); the prompt, the dialogue up to the last "Assistant:", must be the same in both.
    As in read_ultrachat otherwise."""
    def parse(record):
        if not {"chosen", "rejected"} <= record.keys():
            raise DataError("missing 'chosen' or 'rejected'")
        chosen = _hh_dialogue(record["chosen"])
        rejected = _hh_dialogue(record["rejected"])
        prompts = [[(role, said.strip()) for role, said in d[:-1]] for d in (chosen, rejected)]
        if prompts[0] != prompts[1]:
            raise DataError("'chosen' and 'rejected' have different prompts")

        prompt = encode_prompt(tokenizer, chosen[:-1], template, system)
        answers = [encode_response(tokenizer, d[-1][1], template) for d in (chosen, rejected)]
        return PreferenceExample(prompt, *answers)

    _check_template(tokenizer, template)
    paths = _paths(paths)
    result = ReadResult(", ".join(map(str, paths)), max_tokens)
    return _read(_jsonl_records(paths), parse, result, strict)


def split_dataset(items: Sequence, *, val: Union[int, float], test: Union[int, float] = 0,
                  seed: int = 0) -> tuple:
    """A seeded random split into (train, val, test) lists; val/test are counts, or
    fractions if < 1."""
    n = len(items)

    def count(size) -> int:
        if isinstance(size, float) and size < 1:
            return round(size * n)
        return int(size)

    n_val = count(val)
    n_test = count(test)
    if n_val + n_test > n:
        raise ValueError(f"cannot take val={n_val} + test={n_test} from {n} examples")

    order = np.random.default_rng(seed).permutation(n)
    val_idx, test_idx, train_idx = np.split(order, [n_val, n_val + n_test])
    return tuple([items[i] for i in idx] for idx in (train_idx, val_idx, test_idx))


def response_batch(prompts: Sequence, responses: Sequence, pad_id: int = 0) -> tuple:
    """Right-padded prompt + response rows (task data, sampled responses): tokens (B, T)
    int64, mask (B, T) bool, True exactly at the response tokens, EOS included. The mask
    comes from lengths, not `tokens != pad_id`, so any pad_id and a prompt holding the EOS
    id work. Right padding is harmless: under causal attention, no scored position sees
    it."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")

    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = np.concatenate([p, r])  # prompt + response
        tokens[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[i, len(p):len(row)] = True
    return tokens, mask


def packed_batch(prompts: Sequence, responses: Sequence) -> tuple:
    """Prompt + response sequences packed end to end into rows, for the forwards that score
    responses (task, constraint and evaluation steps): the linear layers see little padding.
    Returns tokens (R, T) int64, mask (R, T) bool (True exactly at the response tokens, EOS
    included) and segments (R, T) int64: the index 0..B-1 of the sequence each token is in;
    a row's padding, unscored, is its last sequence's. model.Transformer and l3m.logp_norm
    take the segments, so each sequence is scored as if it stood alone."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    seqs = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
    lengths = [len(seq) for seq in seqs]
    # The fewest rows the tokens allow, each as short as first fit lets it be: rows as
    # long as the longest sequence leave 13 % of the demo's task tokens padding, these
    # 9 %, and attention costs the same (R·T² within 0.4 %).
    n_rows = math.ceil(sum(lengths) / max(lengths))
    width = max(lengths)
    while len(rows := first_fit(lengths, width)) > n_rows:
        width += 1
    T = max(sum(lengths[i] for i in row) for row in rows)
    tokens = torch.zeros((len(rows), T), dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    segments = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            end = at + len(seqs[i])
            tokens[r, at:end] = torch.as_tensor(seqs[i], dtype=torch.long)
            mask[r, at + len(prompts[i]):end] = True
            segments[r, at:] = i  # to the row's end: the last sequence's owns the padding
            at = end
    return tokens, mask, segments


def first_fit(lengths: Sequence, width: int) -> list:
    """Bin packing by first fit, longest first: rows (lists of indices into lengths) of at
    most `width` tokens each."""
    rows, room = [], []  # the sequences of each row, and its free length
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [j for j, free in enumerate(room) if free >= lengths[i]]
        if not fits:
            rows.append([])
            room.append(width)
            fits = [len(rows) - 1]
        rows[fits[0]].append(i)
        room[fits[0]] -= lengths[i]
    return rows


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per rank and epoch: the remainder that does not fill a global batch is
    dropped."""
    return n // (batch_size * world_size)


def batch_indices(n: int, batch_size: int, position: int, *, seed: int, rank: int = 0,
                  world_size: int = 1):
    """This rank's rows (batch_size,) of global batch number `position` of a stream of
    epochs. Epoch e is a permutation seeded by (seed, e), cut into num_batches global
    batches of G = batch_size·world_size rows; rank r takes the r-th part of each. Ranks
    are disjoint and equally long (equal FSDP collectives); a resume needs only the
    position."""
    nb = num_batches(n, batch_size, world_size)
    if nb == 0 or not 0 <= rank < world_size:
        raise ValueError(f"{n} examples, rank {rank} of {world_size}: need 0 <= rank < world_size "
                         f"and at least one global batch of {batch_size} × {world_size}")

    epoch, b = divmod(position, nb)
    start = (b * world_size + rank) * batch_size
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[start:start + batch_size]


class Stream:
    """Global batches of one split, epoch after epoch (batch_indices); `position` is all a
    resume needs."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.n = n
        self.batch_size = batch_size  # per rank
        self.seed = seed
        self.rank = rank
        self.world = world
        self.per_epoch = num_batches(n, batch_size, world)
        self.position = 0  # the global batch that next() returns

    def next(self) -> np.ndarray:
        """This rank's rows of global batch `position`, which then moves on by one."""
        self.position += 1
        return batch_indices(self.n, self.batch_size, self.position - 1, seed=self.seed,
                             rank=self.rank, world_size=self.world)

# Demo data: questions about 24 animals and things, answered by 1 to 5 sentences, maybe
# with an opener or a closer. The length is a free choice (10 to ~150 tokens for the same
# question), so a length constraint can move it at little cost to the task. A sentence is
# a fact about the thing asked ("The owl mostly eats mice and insects."), a caution, i.e. a
# safety or hedging note ("Never try to touch or feed a wild owl."), or a filler, neither
# ("Many people enjoy learning about the owl."). The analogues of helpful and harmless:
# informative and cautious, the shares of facts and of cautions. Cautions take the place
# of facts, so the two are negatively correlated; fillers let a response lack both.
MAX_BODY = 5  # body sentences: answers of 10 to ~150 demo tokens, median ~57
DEMO_SIZES = {"task": 4000, "preference_train": 2000, "preference_test": 200}
_DEMO_VERSION = 1  # bump when the generator changes, so stale caches are not reused
_ANIMALS = {  # name: colour; home; food; size; skill; group
    "owl": "brown and white; old forests; mice and insects; half a metre; "
           "seeing in the dark; a parliament",
    "fox": "red and white; woods and fields; rabbits and berries; one metre; "
           "hearing mice under snow; a skulk",
    "whale": "dark grey; cold deep oceans; krill and small fish; twenty metres; "
             "diving deep; a pod",
    "bee": "yellow and black; hives and hollow trees; nectar and pollen; one centimetre; "
           "finding flowers; a swarm",
    "horse": "brown, black or grey; grassy fields; grass and hay; two metres; "
             "running long distances; a herd",
    "frog": "green with dark spots; ponds and wet meadows; flies and worms; "
            "eight centimetres; jumping far; an army",
    "eagle": "dark brown; high cliffs; fish and small animals; one metre; "
             "spotting prey from far away; a convocation",
    "rabbit": "grey or brown; burrows under meadows; grass and clover; forty centimetres; "
              "hearing danger; a colony",
    "shark": "grey with a pale belly; warm seas; fish and seals; four metres; "
             "smelling blood in the water; a shiver",
    "bear": "brown or black; forests and mountains; berries, roots and fish; two metres; "
            "climbing trees; a sloth",
    "penguin": "black and white; icy southern coasts; fish and krill; one metre; "
               "swimming under water; a waddle",
    "snail": "brown with a spiral shell; damp gardens; leaves and soft plants; "
             "three centimetres; climbing walls; a walk",
}
_THINGS = {  # name: material; use; parts; weight; first made; kept
    "hammer": "steel and wood; drive nails into wood; a heavy head and a long handle; "
              "half a kilogram; thousands of years ago; in a toolbox",
    "kettle": "steel or plastic; boil water for tea; a spout, a lid and a handle; "
              "one kilogram; in old China; in the kitchen",
    "ladder": "wood or aluminium; reach high places; two rails and many rungs; "
              "eight kilograms; in ancient Egypt; in a shed or garage",
    "compass": "plastic and a magnet; find the way north; a needle and a round dial; "
               "fifty grams; in China a thousand years ago; in a backpack",
    "kite": "paper or cloth; fly in the wind for fun; a light frame and a long string; "
            "two hundred grams; in China long ago; in a cupboard",
    "lamp": "metal and glass; light up a room; a bulb, a shade and a switch; "
            "two kilograms; to burn oil long ago; on a desk or table",
    "bicycle": "steel or aluminium; travel without a motor; two wheels, pedals and a chain; "
               "twelve kilograms; in Germany in the year 1817; in a garage",
    "violin": "spruce and maple wood; play music; four strings and a bow; "
              "half a kilogram; in Italy five hundred years ago; in a hard case",
    "telescope": "metal and glass lenses; look at stars and planets; a long tube and a stand; "
                 "five kilograms; in the year 1608; in a dry room",
    "umbrella": "cloth and thin metal ribs; stay dry in the rain; a canopy, ribs and a handle; "
                "four hundred grams; in ancient China; by the front door",
    "candle": "wax and a cotton wick; give a soft light; a wick inside a block of wax; "
              "two hundred grams; in ancient Rome; in a drawer",
    "clock": "wood, metal or plastic; tell the time; a face, two hands and gears; "
             "one kilogram; in the middle ages; on a wall or shelf",
}
_ANIMAL_FACTS = ["{S} is usually {0}.", "{S} lives in {1}.", "{S} mostly eats {2}.",
                 "An adult {name} is about {3} long.", "{S} is very good at {4}.",
                 "A group of them is called {5}."]
_THING_FACTS = ["{S} is usually made of {0}.", "{S} is used to {1}.", "{S} has {2}.",
                "{S} weighs about {3}.", "{S} was first made {4}.", "{S} is often kept {5}."]
_CAUTIONS = {
    "animal": ["Please keep a safe distance if you meet a wild {name}.",
               "Never try to touch or feed a wild {name}.",
               "If you are not sure, ask a local expert before you go near one."],
    "thing": ["Please read the safety instructions before you use the {name}.",
              "Keep the {name} away from small children.",
              "If you are not sure how to use it, ask someone with experience."],
    "any": ["I may be wrong about some details, so please check a trusted source.",
            "Please be careful and stay safe."],
}
_FILLERS = ["The {name} is an interesting subject.",
            "Many people enjoy learning about the {name}.",
            "There is a lot that could be said about it."]
_OPENERS = ["Sure.", "Good question.", "Here is what I know about the {name}."]
_CLOSERS = ["I hope this helps.", "Let me know if you want to know more."]
_QUESTIONS = ["Tell me about the {name}.", "What do you know about the {name}?",
              "Can you describe the {name}?", "What is the {name} like?",
              "I would like to learn about the {name}.",
              "Could you tell me something about the {name}?"]
_FOLLOW_UPS = ["And what about the {name}?", "Now tell me about the {name}.",
               "What can you say about the {name}?"]


def _sentences(name: str) -> dict:
    """kind -> the sentences an answer about name may hold; "named"/"it": its six facts
    about "The {name}"/"It"."""
    if name in _ANIMALS:
        kind, table, facts = "animal", _ANIMALS, _ANIMAL_FACTS
    else:
        kind, table, facts = "thing", _THINGS, _THING_FACTS
    fields = table[name].split("; ")

    def fmt(templates, subject=None) -> list:
        return [t.format(*fields, S=subject, name=name) for t in templates]

    return {
        "named": fmt(facts, f"The {name}"),
        "it": fmt(facts, "It"),
        "filler": fmt(_FILLERS),
        "caution": fmt(_CAUTIONS[kind] + _CAUTIONS["any"]),
        "opener": fmt(_OPENERS),
        "closer": fmt(_CLOSERS),
    }


def _style(rng: random.Random) -> tuple:
    """(caution share, filler share) of a response: half of the responses have no caution
    at all."""
    caution = 0.0 if rng.random() < 0.5 else rng.uniform(0.2, 0.7)
    return caution, rng.uniform(0.0, 0.3)


def demo_answer(rng: random.Random, name: str, n_body: int, caution: float, filler: float) -> str:
    """An answer about name: maybe an opener, n_body ≥ 1 sentences (each a caution with
    probability `caution`, else a filler with probability `filler`, else a fact; none
    twice, so at most the 6 facts), the cautions last, maybe a closer. The first fact names
    the subject, later ones say "It"."""
    s = _sentences(name)
    kinds = []
    for _ in range(n_body):
        if rng.random() < caution:
            kinds.append("caution")
        elif rng.random() < filler:
            kinds.append("filler")
        else:
            kinds.append("fact")

    def pick(kind, pool) -> list:  # distinct sentences, as many as drawn of the kind
        return rng.sample(pool, min(len(pool), kinds.count(kind)))

    body = [("filler", t) for t in pick("filler", s["filler"])]
    body += [("fact", i) for i in pick("fact", range(6))]
    rng.shuffle(body)
    sentences = []
    named = False
    for kind, x in body:
        if kind == "filler":
            sentences.append(x)
        elif not named:
            sentences.append(s["named"][x])
            named = True
        else:
            sentences.append(s["it"][x])

    # the random draws go opener, closer, cautions: the order the demo data was made with
    opener = [rng.choice(s["opener"])] if rng.random() < 0.35 else []
    closer = [rng.choice(s["closer"])] if rng.random() < 0.15 else []
    cautions = pick("caution", s["caution"])
    return " ".join(opener + sentences + cautions + closer)


def demo_dialogue(rng: random.Random) -> list:
    """An UltraChat-style "data" list: one exchange, or (30 %) two about different names."""
    names = rng.sample(sorted(_ANIMALS) + sorted(_THINGS), 2)

    def answer(name: str) -> str:
        return demo_answer(rng, name, rng.randint(1, MAX_BODY), *_style(rng))

    turns = [rng.choice(_QUESTIONS).format(name=names[0]), answer(names[0])]
    if rng.random() < 0.3:
        turns += [rng.choice(_FOLLOW_UPS).format(name=names[1]), answer(names[1])]
    return turns


@functools.lru_cache(maxsize=1)
def _sentence_kinds() -> dict:
    """sentence -> "fact" | "caution" | "filler", for every sentence the demo generator
    writes."""
    # the rest (openers and closers too) is filler
    kind_of = {"named": "fact", "it": "fact", "caution": "caution"}
    kinds = {}
    for name in list(_ANIMALS) + list(_THINGS):
        for key, sentences in _sentences(name).items():
            for sentence in sentences:
                kinds[sentence] = kind_of.get(key, "filler")
    return kinds


def demo_properties(response: str) -> tuple:
    """(informative, cautious) of a demo response: the shares of its sentences that are
    facts (about any subject) and cautions. A sentence the generator never writes (a
    garbled sample) is neither."""
    pieces = re.split(r"(?<=[.!?])\s+", response.strip())  # ≥ 1 piece: "" if empty
    kinds = [_sentence_kinds().get(s) for s in pieces]
    return kinds.count("fact") / len(kinds), kinds.count("caution") / len(kinds)


def demo_preference(rng: random.Random, prop: str) -> dict:
    """An HH-format pair: two answers of the same number of sentences to one question, y⁺
    the one with the larger share of prop ("informative" or "cautious"); ties are drawn
    again."""
    which = {"informative": 0, "cautious": 1}[prop]
    name = rng.choice(sorted(_ANIMALS) + sorted(_THINGS))
    prompt = "\n\nHuman: " + rng.choice(_QUESTIONS).format(name=name) + "\n\nAssistant: "
    n_body = rng.randint(1, MAX_BODY)
    while True:
        a = demo_answer(rng, name, n_body, *_style(rng))
        b = demo_answer(rng, name, n_body, *_style(rng))
        share_a = demo_properties(a)[which]
        share_b = demo_properties(b)[which]
        if share_a > share_b:
            return {"chosen": prompt + a, "rejected": prompt + b}
        if share_b > share_a:
            return {"chosen": prompt + b, "rejected": prompt + a}

DemoFiles = namedtuple("DemoFiles", ["folder", "tokenizer", "task", "informative_train",
                                     "informative_test", "cautious_train", "cautious_test"])


def prepare_demo(out_dir, seed: int = 0, vocab_size: int = 1024) -> DemoFiles:
    """Build the demo data under out_dir once, deterministic in seed (later calls reuse it);
    returns its paths: the tokenizer, the task data (UltraChat's {"id", "data"}), two
    preference sets (HH's) for helpful/harmless-like RMs."""
    folder = Path(out_dir) / f"demo_v{_DEMO_VERSION}_seed{seed}_vocab{vocab_size}"
    jsonl = [folder / f"{name}.jsonl" for name in DemoFiles._fields[2:]]
    files = DemoFiles(folder, folder / "tokenizer.model", *jsonl)
    if folder.is_dir():
        return files

    # Every rank calls this at once: one builds while the others wait on the lock, then
    # reuse its folder. The lock, not a race of renames, because a rename onto the folder
    # would replace it while another rank may be reading it.
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if folder.is_dir():
            return files

        # Written beside the folder, then renamed into place, so that a reader (or a build
        # killed midway) sees the whole folder or none. Under the lock, a .tmp folder that
        # is there already was left by a killed build.
        tmp = Path(f"{folder}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_demo(tmp, seed, vocab_size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, folder)
    return files


def _write_demo(folder: Path, seed: int, vocab_size: int):
    """The demo's JSONL files and its tokenizer, into an empty folder."""
    rng = random.Random(seed)
    task = [{"id": str(i), "data": demo_dialogue(rng)} for i in range(DEMO_SIZES["task"])]
    prefs = {}
    for prop in ("informative", "cautious"):
        for split in ("train", "test"):
            size = DEMO_SIZES[f"preference_{split}"]
            prefs[f"{prop}_{split}"] = [demo_preference(rng, prop) for _ in range(size)]
    for name, records in {"task": task, **prefs}.items():
        text = "".join(json.dumps(r) + "\n" for r in records)
        Path(folder, f"{name}.jsonl").write_text(text, encoding="utf-8")

    # A small sentencepiece model of every text above, with an exact round trip (identity
    # normalisation, whitespace kept, bytes for unseen characters), LLaMA's ids (unk 0,
    # bos 1, eos 2, no pad), ≤ vocab_size pieces. One thread and no output path inside the
    # model: the file is the same byte for byte wherever it is built.
    corpus = [render_dialogue(_ultrachat_dialogue(r)) for r in task]
    corpus += [r[k] for records in prefs.values() for r in records for k in ("chosen", "rejected")]
    import sentencepiece as spm
    with open(Path(folder, "tokenizer.model"), "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=f, vocab_size=vocab_size,
            model_type="unigram", normalization_rule_name="identity",
            remove_extra_whitespaces=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)

"""Generating text from a checkpoint: one-shot prompts (`hanyeong model generate`) and a multi-turn
chat in the terminal (`hanyeong chat`), on either backend.

A chat prompt is [BOS] + the EXAONE chat template's rendering (orchestration/data/chat.py, the
tokenizer's tokenizer_config.json template) with the assistant turn opened; the reply ends at
[|endofturn|] (or [EOS]). Replies stream through the tokenizer's byte-safe stream decoder, so a
Hangul syllable split over tokens is printed only once it is whole. The backend protocol's generate
returns whole rows, so a streamed reply is generated in chunks of STREAM_CHUNK tokens (each chunk
re-reads the prompt; a backend streaming hook would remove that cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hanyeong.errors import ConfigError

STREAM_CHUNK = 16  # tokens per generate call while streaming


@dataclass(frozen=True)
class SamplingConfig:
    """How replies are sampled; the CLI options map onto these fields."""

    max_new_tokens: int = 256
    """Most tokens of one reply."""
    temperature: float = 0.0
    """0: greedy; above: nucleus sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus: sample from the smallest set of tokens holding this much probability."""
    seed: int = 0
    """Seeds sampling: the same seed gives the same replies."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Talker:
    """A loaded model, its tokenizer and the sampling settings."""

    backend: object
    model: object
    tokenizer: object
    sampling: SamplingConfig
    stop_ids: list[int] = field(default_factory=list)
    suppress_ids: object = None
    calls: int = 0

    @classmethod
    def load(cls, ckpt: str | Path, backend: str, tokenizer_dir: str | Path | None,
             sampling: SamplingConfig) -> Talker:  # fmt: skip
        from orchestration.core.backends import get_backend
        from orchestration.core.checkpoint import load_spec
        from orchestration.core.generation import suppressed_ids
        from orchestration.eval.evaluate import load_tokenizer

        tokenizer, _ = load_tokenizer(ckpt, tokenizer_dir)
        spec = load_spec(ckpt)
        engine = get_backend(backend)
        stops = [tokenizer.hf.token_to_id("[|endofturn|]"), tokenizer.hf.token_to_id("[EOS]")]
        suppress = suppressed_ids(spec.vocab_size, stops, tokenizer_size=tokenizer.vocab_size)
        return cls(engine, engine.load(ckpt), tokenizer, sampling, stops, suppress)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """[BOS] + the conversation rendered by the chat template, the assistant turn opened."""
        from orchestration.data.chat import render

        return [self.tokenizer.hf.token_to_id("[BOS]"), *self.tokenizer.encode(render(messages, True))]

    def generate(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> list[list[int]]:
        s = self.sampling
        self.calls += 1  # a fresh seed per call: chunks of one reply do not repeat their draws
        return self.backend.generate(self.model, prompts, max_new_tokens or s.max_new_tokens, s.temperature,
                                     s.top_p, s.seed + self.calls - 1, self.stop_ids,
                                     suppress_ids=self.suppress_ids)  # fmt: skip

    def complete(self, texts: list[str], chat: bool = False, system: str | None = None) -> list[str]:
        """One reply per prompt, generated as one batch (chat: each prompt is a user turn)."""
        if chat:
            head = [{"role": "system", "content": system}] if system else []
            prompts = [self.chat_ids([*head, {"role": "user", "content": t}]) for t in texts]
        else:
            prompts = [[self.tokenizer.hf.token_to_id("[BOS]"), *ids] for ids in self.tokenizer.encode_batch(texts)]
        return [self.text(ids) for ids in self.generate(prompts)]

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.stream_decoder(skip_special_tokens=True).decode(ids)

    def stream(self, prompt: list[int], write: Callable[[str], None]) -> list[int]:
        """Generate a reply to `prompt`, writing its text as it becomes whole; the reply's ids."""
        decoder, reply = self.tokenizer.stream_decoder(skip_special_tokens=True), []
        while len(reply) < self.sampling.max_new_tokens:
            n = min(STREAM_CHUNK, self.sampling.max_new_tokens - len(reply))
            new = self.generate([prompt + reply], n)[0]
            reply += new
            write("".join(decoder.step(i) for i in new))
            if len(new) < n or (new and new[-1] in self.stop_ids):
                break
        write(decoder.flush())
        return reply


HELP = "/reset starts over, /exit (or Ctrl-D) ends."


def chat_loop(talker: Talker, system: str | None, read: Callable[[str], str],
              write: Callable[[str], None]) -> None:  # fmt: skip
    """Read a user turn, stream the reply, remember both; /reset, /exit, end of input."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    write(f"chat: {HELP}\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            messages = list(start)
            write("(conversation reset)\n")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        reply = talker.stream(talker.chat_ids(messages), write)
        write("\n")
        messages.append({"role": "assistant", "content": talker.text(reply)})

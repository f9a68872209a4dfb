"""A token batch whose text is still empty (a byte token inside a UTF-8 character, or an id without text, as most
of a synthetic model's 32000 ids under the byte tokenizer) reaches the serve request when it is decoded: with
logprobs asked, the stream carries those tokens at once (an H100 load bench on synthetic 7B shapes saw every
token of a 128-token answer arrive at the end before this). The HTTP side is tested in test_serve.py."""
import asyncio
from types import SimpleNamespace

from case4_sampling import SamplingParams
from conductor.run import Generation, Request
from conductor.serve import Job


def _procs():
    return SimpleNamespace(info={"eos_ids": []}, tinfo={"eos_ids": [], "has_chat_template": False})


def test_generation_hands_on_batches_with_empty_text():
    got = []
    g = Generation(_procs(), Request(params=SamplingParams(), prompt="x", ignore_eos=True), on_text=got.append)
    g.emit([300, 301], "", [1.0, 2.0])
    g.emit([65], "A", 3.0)
    g.emit([], "", 4.0)  # nothing decoded: nothing to hand on
    assert got == ["", "A"]
    assert g.tokens == [300, 301, 65] and g.t_tok == [1.0, 2.0, 3.0]


def test_job_streams_empty_text_tokens_with_their_logprobs_only_when_asked():
    loop = asyncio.new_event_loop()
    try:
        # the first batch always makes an event (a stream's first event is its first token, the TTFT any client
        # sees: docs/serve.md "Latency"); a later batch with no text only when logprobs are asked
        for logprobs, want in ((0, [("text", "", ["lp300", "lp301"]), ("text", "A", ["lp65"]), ("text", "", ["lp302"])]),
                               (None, [("text", "", []), ("text", "A", [])])):
            job = Job(Request(params=SamplingParams(), prompt="x", ignore_eos=True), 16, [], loop, logprobs)
            job.gen = Generation(_procs(), job.req, on_text=job.on_text)
            job.gen.logprobs.extend(["lp300", "lp301"])
            job.gen.emit([300, 301], "", [1.0, 2.0])
            job.gen.logprobs.append("lp65")
            job.gen.emit([65], "A", 3.0)
            job.gen.logprobs.append("lp302")
            job.gen.emit([302], "", 4.0)
            loop.run_until_complete(asyncio.sleep(0))  # the queued call_soon_threadsafe puts
            events = []
            while not job.events.empty():
                events.append(job.events.get_nowait())
            assert events == want, (logprobs, events)
    finally:
        loop.close()

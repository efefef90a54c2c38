"""The diffusion engine end to end: relay, ``python -m worker --engine diffusion --model <tiny>``, producer."""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import orjson

from media.codec import decode_image
from relay.client import connect
from tests.helpers import input_frame, jpeg, recv_frame, recv_json
from tests.test_commands import ROOT

SIZE = 384


async def test_worker_process_runs_the_tiny_diffusion_model(relay, tiny):
    defaults = {"vae_id": str(tiny.tiny_vae), "use_lcm_lora": False, "width": SIZE, "height": SIZE,
                "t_index_list": [10, 30], "prompt": "a red fox"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "--relay", relay.url, "--engine", "diffusion",
        "--model", str(tiny.sd), "--params", orjson.dumps(defaults).decode(), cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=asyncio.subprocess.PIPE)
    try:
        producer, _ = await connect(relay.url, "producer", "cam")
        ready = await recv_json(producer, "report", event="ready")
        assert ready["data"]["engine"] == "diffusion"
        sent = [jpeg(SIZE, SIZE, seed=i) for i in range(4)]
        outputs = []
        for seq, image in enumerate(sent):
            await producer.send(input_frame(seq, image, "cam", SIZE, SIZE))
            frame = await recv_frame(producer)
            assert frame.seq == seq and (frame.width, frame.height) == (SIZE, SIZE)
            outputs.append(decode_image(frame.payload).astype(int))
        assert np.abs(outputs[-1] - decode_image(sent[-1]).astype(int)).mean() > 5  # not an identity
        # a hot params change reaches the engine and is stamped on the next results
        await producer.send(orjson.dumps({"type": "params", "params": {"seed": 7}}).decode())
        version = (await recv_json(producer, "params_ack"))["version"]
        for seq in range(10, 40):
            await producer.send(input_frame(seq, sent[0], "cam", SIZE, SIZE))
            if (await recv_frame(producer)).params_version == version:
                break
        else:
            raise AssertionError("the params change never reached the output")
        await producer.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)

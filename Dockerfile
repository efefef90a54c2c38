# GPU image for the StreamDiffusion server. Not built in CI (no Docker engine there).
# Build: docker build -t streamdiffusion-server .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HOME=/models TENSORRT_CACHE_DIR=/app/engines \
    STREAMDIFFUSION_SERVER__HOST=0.0.0.0 STREAMDIFFUSION_SERVER__DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev build-essential ffmpeg libgl1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
COPY requirements.txt requirements-diffusion.txt requirements-cluster.txt ./
# torch first and pinned: the CUDA build of the same version the tests use on CPU; nats-py (small,
# pure Python) so that one image serves alone or as a cluster node (relay.nats)
RUN pip install torch==2.13.0 \
    && pip install -r requirements.txt -r requirements-diffusion.txt -r requirements-cluster.txt
COPY . .
RUN pip install --no-deps .

# 8080: REST API, WHIP/WHEP, MJPEG, HLS, web page; 8765: relay for remote workers and producers
EXPOSE 8080 8765
# models: Hugging Face cache; engines: TensorRT engines; data: server state (the generated API key)
VOLUME ["/models", "/app/engines", "/data"]
CMD ["sd-server", "--config", "/app/config.yaml"]

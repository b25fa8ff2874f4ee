# APB-V Video QA on CUDA GPUs.
#   docker build -t apbv-qa .
#   docker run --gpus all -p 7860:7860 apbv-qa                      # embedded tiny model, every visible GPU
#   docker run --gpus all -p 7860:7860 -v /models:/models apbv-qa \
#       python app.py --host 0.0.0.0 --model /models/Qwen2.5-VL-7B-Instruct --gpus 4
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY requirements.txt .
# Keep the image's CUDA build of torch: pin it so that pip fails rather than replacing it.
RUN pip freeze | grep -E '^torch==' > /tmp/keep-torch.txt \
 && pip install --no-cache-dir -c /tmp/keep-torch.txt -r requirements.txt
COPY . .

EXPOSE 7860
CMD ["python", "app.py", "--host", "0.0.0.0"]

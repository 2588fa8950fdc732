FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared shared
COPY gateway gateway
COPY worker worker
COPY tokenrelay tokenrelay
RUN pip install --no-cache-dir .
ENTRYPOINT ["tokenrelay"]

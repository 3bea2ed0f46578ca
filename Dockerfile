# Worker image. (No Docker engine runs on the project's build machines, so this file is not exercised
# in CI; deploy/local/ is the tested path.)
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/local/constraints.txt ./
COPY contracts ./contracts
COPY worker ./worker
RUN pip install --no-cache-dir -c constraints.txt .
USER nobody
EXPOSE 9100
CMD ["llm-worker", "run"]

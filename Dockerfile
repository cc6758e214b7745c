FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY longhaul ./longhaul
COPY models ./models
COPY worker ./worker
RUN pip install --no-cache-dir .
ENV LONGHAUL_DATABASE_URL=sqlite:////data/tasks.db
VOLUME /data
CMD ["longhaul", "worker", "--processes", "2", "--threads", "4"]

# syntax=docker/dockerfile:1
# Stage 1 trains and exports the default models (needs torch, CPU wheel).
FROM python:3.11-slim AS models
WORKDIR /src
COPY pyproject.toml README.md ./
COPY training training
COPY service service
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir '.[train,serve]'
RUN python -m training defaults --repository /models --runs /tmp/runs

# Stage 2 serves them: no torch in this image.
FROM python:3.11-slim AS serve
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service service
RUN pip install --no-cache-dir '.[serve]' && useradd --create-home foldserve
COPY --from=models --chown=foldserve /models /models
USER foldserve
ENV FOLDSERVE_REPOSITORY=/models FOLDSERVE_HOST=0.0.0.0 FOLDSERVE_PORT=8000
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"
CMD ["python", "-m", "service"]

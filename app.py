"""Hugging Face Space entry point: serve the domainchat web app (UI at /, API beside it)."""

from domainchat.ui import serve

if __name__ == "__main__":
    serve(host="0.0.0.0", port=7860)  # a Space routes its traffic to port 7860

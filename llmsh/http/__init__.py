"""OpenAI- and Ollama-compatible HTTP API served on the kernel's own event loop (Starlette + uvicorn).

Every HTTP request becomes a request of an llmsh process through `llmsh.kernel.front.Processes.generate`, so it is
seen in `ps` (REQS), scheduled by nice, batched with the shell's requests, and stopped by STOP/KILL like any other.
Nothing here imports torch.
"""

"""`crema gateway`: an OpenAI-compatible chat-completions endpoint in front of the `crema` Triton ensemble
(docs/gateway.md). Gateway/Settings: gateway/app.py; request parsing: chat.py; media: media.py."""

"""Export to llama.cpp and Ollama: GGUF LoRA adapters, merged GGUF models, Modelfiles."""

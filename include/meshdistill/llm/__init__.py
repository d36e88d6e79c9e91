"""The LLM layer: stage schemas, versioned prompts, and backends behind one interface.

``backend`` defines the interface (:class:`~meshdistill.llm.backend.LLMBackend`,
``LLMRequest``, ``LLMResult``, ``cache_key``); ``offline`` and ``openai_backend`` (with
``client_process``) implement it; ``cache`` and ``budget`` wrap any backend; ``config``
chooses one from settings; ``stages`` builds each stage's request from its inputs;
``embeddings`` is the client of an embeddings endpoint. Import from those modules: this
package stays empty so that importing one of them costs only what it needs.
"""

"""The router: TGI- and OpenAI-compatible HTTP front that dispatches requests to replica agents."""

"""Who may call, and with which credentials: principals and admin callers (``principal``),
the LLM plane's ``authenticate`` step (``step``, ``authenticator``), gateway keys (``keys``,
``keyring``, ``pepper``, ``keys_api``), JWTs (``jwt``) fetched through the egress guard
(``egress``), upstream credential pools (``pools``), the admin plane (``admin_auth``,
``planes``), allowed ``Host`` names (``hosts``), and the ``auth`` config block (``config``)."""

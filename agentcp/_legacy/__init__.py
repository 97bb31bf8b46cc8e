"""agentcp 0.1.99 compatibility: the one place for the names 0.1.99 shipped that this release keeps only for
existing code.

0.1.99 carried stale top-level copies of its modules (``agentcp.auth_client``, ``agentcp.session_manager``,
``agentcp.group_manager`` ...; api.md §1). Each such ``agentcp/<name>.py`` here is a two-line home that re-exports
the current class from its canonical module; what has no current equivalent is built in this package, as thin
adapters over the current classes (no protocol logic is duplicated):

* :mod:`agentcp._legacy.sessions`: the pre-0.1.90 ``Session``/``SessionManager`` and ``Group``/``GroupManager``
  (per-session callbacks) over :class:`agentcp.msg.session_manager.SessionManager`;
* :mod:`agentcp._legacy.signatures`: methods 0.1.99 declared without ``self``.

New code should import from the canonical modules (``agentcp.base``, ``agentcp.msg``, ``agentcp.ca`` ...).
"""

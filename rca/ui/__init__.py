"""The workbench: a Streamlit app over the case store (``streamlit run app.py``).

``app.py`` at the repository root builds the navigation; each page is a script in this
package, run by Streamlit (never imported): ``cases.py``, ``case_detail.py``,
``new_investigation.py``, ``regression.py``, ``monitors.py``, ``audit.py`` and ``empty.py``
(the page shown while there is no database). ``rca.ui.common`` holds what they share: where the
database is, read-only access to it, and the helpers that turn stored rows into tables and
escaped HTML.
The pages read the database read-only on every call and write only through the writer's short
transactions (``Store.add_note``, ``investigate``), so they keep working while the CLI writes.
"""

"""The admin API's OpenAPI 3.1 document, served at ``GET /admin/v1/openapi.json``.

Operators point client generators and API tools at it instead of transcribing
docs/admin.md. ``document`` builds it from admin.py's route table and ``schemas``
from the same field tables the answers are rendered from, so a route or field added
in one place and not the other fails tests/test_openapi.py instead of leaving a
document that silently lies.
"""

from bastion.openapi.document import OPERATIONS, admin_document

__all__ = ["OPERATIONS", "admin_document"]

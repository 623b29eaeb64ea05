"""MONAI bundle export (``busi-monai export-bundle``) and its template."""

"""The projects API: create, share and transfer projects."""

"""Quality proxies, reports and plots."""

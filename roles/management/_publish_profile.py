"""The ``.PublishSettings`` file Visual Studio and WebMatrix import: one profile for web deploy, one for FTP.

The attribute set follows the files Azure Web Sites handed out, so existing tools read it unchanged.
"""

from __future__ import annotations

from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

__all__ = ["publish_settings"]


def publish_settings(
    *, site: str, site_url: str, deploy_url: str, ftp_host: str, ftp_port: int, user: str, password: str
) -> bytes:
    deploy = urlsplit(deploy_url)
    deploy_host = f"{deploy.hostname}:{deploy.port or 443}"
    common = {
        "userName": user,
        "userPWD": password,
        "destinationAppUrl": site_url,
        "SQLServerDBConnectionString": "",
        "mySQLDBConnectionString": "",
        "hostingProviderForumLink": "",
        "controlPanelLink": "",
        "webSystem": "WebSites",
    }
    root = ET.Element("publishData")
    web_deploy = ET.SubElement(
        root,
        "publishProfile",
        {
            "profileName": f"{site} - Web Deploy",
            "publishMethod": "MSDeploy",
            "publishUrl": deploy_host,
            "msdeploySite": site,
            **common,
        },
    )
    ET.SubElement(web_deploy, "databases")
    ftp = ET.SubElement(
        root,
        "publishProfile",
        {
            "profileName": f"{site} - FTP",
            "publishMethod": "FTP",
            "publishUrl": f"ftp://{ftp_host}:{ftp_port}/",
            "ftpPassiveMode": "True",
            **common,
        },
    )
    ET.SubElement(ftp, "databases")
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml + b"\n"

"""The ``.PublishSettings`` file Visual Studio, the Azure tools and FTP clients import: one profile for
Kudu's zip deploy, one for FTP.

The attribute set follows the files Azure App Service hands out, so existing tools read it unchanged:
the ZipDeploy ``publishUrl`` is ``host:port``, to which tools add ``https://`` and ``/api/zipdeploy``;
the FTP ``publishUrl`` is ``ftps://`` as on Azure, explicit TLS (``AUTH TLS``) on the FTP port. There is
no MSDeploy profile: this cloud does not speak the Web Deploy (msdeploy.axd) protocol.
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
    zip_deploy = ET.SubElement(
        root,
        "publishProfile",
        {
            "profileName": f"{site} - Zip Deploy",
            "publishMethod": "ZipDeploy",
            "publishUrl": deploy_host,
            **common,
        },
    )
    ET.SubElement(zip_deploy, "databases")
    ftp = ET.SubElement(
        root,
        "publishProfile",
        {
            "profileName": f"{site} - FTP",
            "publishMethod": "FTP",
            "publishUrl": f"ftps://{ftp_host}:{ftp_port}/",
            "ftpPassiveMode": "True",
            **common,
        },
    )
    ET.SubElement(ftp, "databases")
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml + b"\n"
